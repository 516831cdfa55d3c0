"""Load and check policy files, reporting EVERY problem with its dotted path and YAML line.

The text is composed into a YAML node tree once (nodes keep their line numbers) and constructed from that
tree, so each pydantic error `loc` (`("rules", 2, "action")`) can be walked down the tree to the line it
came from. Checks pydantic cannot make with a useful location are done on the raw data: duplicate mapping
keys (YAML would silently keep the last), duplicate rule ids and unknown detector names.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from policies.schema import DUPLICATE_ID_ERROR, Policy

Loc = tuple[str | int, ...]
# A policy is a few hundred YAML nodes. Aliases can make a short text expand into billions of them (the
# "billion laughs" bomb) or into a cycle; such a text is refused before it is constructed or walked.
MAX_EXPANDED_NODES = 100_000
# PyYAML is pure Python here: ~0.1 ms per list item and quadratic in bracket nesting, so a megabyte of
# items or a few thousand "[" would hold a request thread for minutes. A policy is a few kB.
MAX_POLICY_CHARS = 64_000
MAX_FLOW_DEPTH = 64
_BRACKETS = re.compile(r"[^\[\]{}]+")
# Field name -> how an unknown value of it is called in messages ("unknown aggregation 'maxx'").
_NOUNS = {"kind": "aggregation", "latents": "steer latents"}


@dataclass(frozen=True)
class PolicyIssue:
    """One problem: `source:line[:column]: path: message` (line None when the file could not be read)."""

    source: str
    line: int | None
    path: str
    message: str
    column: int | None = None

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        if self.column is not None:
            where += f":{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class PolicyError(ValueError):
    """An invalid policy; `issues` lists every problem found, in file order."""

    def __init__(self, issues: Iterable[PolicyIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues) or "invalid policy")


def load_policy(path: str | Path, known_detectors: set[str] | None = None) -> Policy:
    """Read and validate a policy file; raises PolicyError listing every issue (file:line: path: message)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise PolicyError([PolicyIssue(str(path), None, "", f"cannot read policy file: {reason}")]) from None
    return parse_policy(text, str(path), known_detectors)


def parse_policy(text: str, source: str = "<policy>", known_detectors: set[str] | None = None) -> Policy:
    policy, issues = check_policy(text, source, known_detectors)
    if issues or policy is None:
        raise PolicyError(issues)
    return policy


def check_policy_text(
    text: str, source: str = "<policy>", known_detectors: set[str] | None = None
) -> list[PolicyIssue]:
    """Every issue in a policy text (empty list: valid). `known_detectors` enables detector-name checks."""
    return check_policy(text, source, known_detectors)[1]


def check_policy(
    text: str, source: str = "<policy>", known_detectors: set[str] | None = None
) -> tuple[Policy | None, list[PolicyIssue]]:
    """(policy, []) when valid, else (None, issues sorted by line)."""
    too_big = _size_problem(text)
    if too_big is not None:
        return None, [PolicyIssue(source, 1, "", too_big)]
    try:
        loader = yaml.SafeLoader(text)  # checks the characters first: a control character is a ReaderError
    except yaml.YAMLError as e:
        return None, [PolicyIssue(source, 1, "", f"invalid YAML: {e}")]
    try:
        root = loader.get_single_node()
        too_big = _alias_problem(root) if root is not None else None
        if too_big is not None:
            return None, [PolicyIssue(source, 1, "", too_big)]
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as e:
        return None, [_yaml_issue(source, e)]
    except yaml.YAMLError as e:  # unmarked (e.g. a reader error on bad characters)
        return None, [PolicyIssue(source, 1, "", f"invalid YAML: {e}")]
    except RecursionError:  # PyYAML composes recursively: thousands of nested brackets
        return None, [PolicyIssue(source, 1, "", "invalid YAML: nested too deeply")]
    finally:
        loader.dispose()
    if root is None:
        return None, [PolicyIssue(source, 1, "", "empty policy file")]
    if not isinstance(data, dict):
        line = root.start_mark.line + 1
        return None, [PolicyIssue(source, line, "", f"a policy must be a mapping, got {type(data).__name__}")]

    issues = [
        PolicyIssue(source, line, path, msg)
        for line, path, msg in [*_duplicate_keys(root, ()), *_rule_checks(data, root, known_detectors)]
    ]
    policy: Policy | None = None
    try:
        policy = Policy.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            if err["type"] == DUPLICATE_ID_ERROR:  # already reported per repeat by _rule_checks
                continue
            loc = tuple(err["loc"])
            issues.append(PolicyIssue(source, _line(root, loc), _dotted(loc), _message(err)))
    if issues:
        return None, sorted(issues, key=lambda i: (i.line or 0, i.path))
    return policy, []


def _size_problem(text: str) -> str | None:
    """Why the text is too large or too deeply bracketed to parse, else None (brackets inside strings
    count too: no policy has 64 of them open at once)."""
    if len(text) > MAX_POLICY_CHARS:
        return f"the policy is over {MAX_POLICY_CHARS} characters: not a policy"
    depth = deepest = 0
    for ch in _BRACKETS.sub("", text):
        depth = depth + 1 if ch in "[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    if deepest > MAX_FLOW_DEPTH:
        return f"the YAML nests more than {MAX_FLOW_DEPTH} brackets deep: not a policy"
    return None


class _Cycle(Exception):
    pass


def _alias_problem(root: Node) -> str | None:
    """Why the node graph cannot be expanded safely (an alias cycle, or more than MAX_EXPANDED_NODES nodes
    once aliases are expanded), else None. Linear in the distinct nodes: each one's size is memoised."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _Cycle
        active.add(key)
        if isinstance(node, MappingNode):
            n = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, SequenceNode):
            n = 1 + sum(size(item) for item in node.value)
        else:
            n = 1
        active.discard(key)
        sizes[key] = n
        return n

    try:
        total = size(root)
    except _Cycle:
        return "a YAML alias refers to a node that contains it (a recursive structure): not a policy"
    if total > MAX_EXPANDED_NODES:
        return f"the YAML expands to more than {MAX_EXPANDED_NODES} nodes through aliases: not a policy"
    return None


# ---- raw-data checks -----------------------------------------------------------------------------------
def _rule_checks(data: dict[str, Any], root: Node, known: set[str] | None) -> Iterator[tuple[int, str, str]]:
    rules = data.get("rules")
    if not isinstance(rules, list):
        return
    first_seen: dict[str, int] = {}
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict):
            continue
        rid, det = rule.get("id"), rule.get("detector")
        if isinstance(rid, str):
            loc: Loc = ("rules", i, "id")
            if rid in first_seen:
                yield (
                    _line(root, loc),
                    _dotted(loc),
                    f"duplicate rule id {rid!r} (first at line {first_seen[rid]})",
                )
            else:
                first_seen[rid] = _line(root, loc)
        steer = rule.get("steer")
        source = steer.get("detector") if isinstance(steer, dict) else None
        for loc, name in ((("rules", i, "detector"), det), (("rules", i, "steer", "detector"), source)):
            if known is not None and isinstance(name, str) and name not in known:
                valid = ", ".join(sorted(known)) or "none"
                yield _line(root, loc), _dotted(loc), f"unknown detector {name!r} (valid: {valid})"


def _duplicate_keys(node: Node, loc: Loc) -> Iterator[tuple[int, str, str]]:
    if isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, (*loc, i))
    elif isinstance(node, MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, ScalarNode):
                line = key.start_mark.line + 1
                if key.value in seen:
                    first = seen[key.value]
                    msg = f"duplicate key {key.value!r} (first at line {first}; YAML keeps only the last)"
                    yield line, _dotted((*loc, key.value)), msg
                seen.setdefault(key.value, line)
                yield from _duplicate_keys(value, (*loc, key.value))


# ---- pydantic errors -> location and message -----------------------------------------------------------
def _line(root: Node, loc: Loc) -> int:
    """Line of the deepest node `loc` reaches: a mapping entry's key line, a list item's first line."""
    node, line = root, root.start_mark.line + 1
    for part in loc:
        if isinstance(node, MappingNode) and isinstance(part, str):
            hits = [(k, v) for k, v in node.value if isinstance(k, ScalarNode) and k.value == part]
            if not hits:
                break
            key, node = hits[-1]  # the last duplicate is the one YAML (and so pydantic) saw
            line = key.start_mark.line + 1
        elif isinstance(node, SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: Any) -> str:
    kind, loc, value = err["type"], tuple(err["loc"]), err.get("input")
    field = next((p for p in reversed(loc) if isinstance(p, str)), "value")
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
        return f"unknown {_NOUNS.get(field, field)} {value!r} (valid: {', '.join(choices)})"
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        valid = f" (valid: {', '.join(model.model_fields)})" if model is not None else ""
        return f"unknown field {field!r}{valid}"
    if kind == "missing":
        return "missing required field"
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if kind not in ("value_error", "assertion_error") and not isinstance(value, dict | list):
        msg += f", got {value!r}"
    return msg


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at `loc` (for listing its valid fields)."""
    model: type[BaseModel] = Policy
    for part in loc:
        if isinstance(part, int):
            continue  # a list index: same item model
        field = model.model_fields.get(part)
        sub = _model_in(field.annotation) if field is not None else None
        if sub is None:
            return None
        model = sub
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _yaml_issue(source: str, e: yaml.MarkedYAMLError) -> PolicyIssue:
    mark = e.problem_mark or e.context_mark
    problem = e.problem or e.context or "syntax error"
    if e.context and e.problem:
        problem = f"{problem} ({e.context}"
        if e.context_mark is not None and mark is not None and e.context_mark.line != mark.line:
            problem += f" at line {e.context_mark.line + 1}"
        problem += ")"
    if mark is None:
        return PolicyIssue(source, 1, "", f"invalid YAML: {problem}")
    return PolicyIssue(source, mark.line + 1, "", f"invalid YAML: {problem}", column=mark.column + 1)
