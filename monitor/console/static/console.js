// featurewatch audit console: progressive enhancement only; every page works without it.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // Conversation page: picking a detector re-colours the tokens (a GET of the same page).
  const select = document.getElementById("detector-select");
  if (select && select.form) {
    select.addEventListener("change", () => select.form.submit());
  }
  // Escape closes a token's latent popover by moving focus off the token.
  document.addEventListener("keydown", (ev) => {
    const active = document.activeElement;
    if (ev.key === "Escape" && active && active.closest(".tok")) {
      active.blur();
    }
  });
});
