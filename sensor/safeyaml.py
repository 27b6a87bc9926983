"""The one YAML loader: every YAML (and JSON) document Envelope reads goes through
:func:`load_yaml`, policies, configs, desired states and objects from files alike.

It is PyYAML's safe loader (libyaml's parser when present) with what safe loading leaves open
closed:

- **aliases are refused**: a few hundred bytes of nested anchors expand into gigabytes when
  constructed (the "billion laughs"); no document Envelope reads needs them, so any ``*alias``
  (and with it the ``<<`` merge key) is an error naming its line;
- **duplicate keys are refused**: YAML keeps the last one silently, so ``mode: enforce`` could
  be overridden further down a long file;
- **depth and size are bounded**: deeper than :data:`MAX_DEPTH` or longer than
  :data:`MAX_BYTES` is an error, not a ``RecursionError`` or a process out of memory.

The document is composed into nodes first (an alias is one shared node, so the graph stays as
small as the text), checked, and only then constructed. A document that starts with ``{`` or
``[`` is read as JSON by the json module (YAML's parser reads JSON's tabs and numbers
differently), with the same refusals and no NaN or Infinity. Every problem is one
:class:`YamlError` line: ``<source>: line N: what``.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_DEPTH = 64
MAX_BYTES = 16 << 20

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Dumper(yaml.SafeDumper):
    """The pure-Python safe dumper (bytes never depend on how PyYAML was built) that writes a
    value shared by two places out twice: what Envelope writes, its loader reads back."""

    def ignore_aliases(self, data) -> bool:
        return True


def dump_yaml(data: Any, **kw) -> str:
    """``data`` as YAML with sorted keys and no anchors or aliases."""
    kw.setdefault("sort_keys", True)
    return yaml.dump(data, Dumper=_Dumper, **kw)


class YamlError(ValueError):
    """A document that is not acceptable YAML; one line naming the source and the line."""


def _line(node) -> str:
    mark = getattr(node, "start_mark", None)
    return f"line {mark.line + 1}: " if mark is not None else ""


def _check(root: yaml.Node, source: str) -> None:
    """Refuse aliases (a node reached twice), duplicate keys and nesting beyond MAX_DEPTH."""
    seen: set[int] = set()
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if id(node) in seen:
            raise YamlError(f"{source}: {_line(node)}the anchor defined here is used again "
                            f"as an alias; YAML aliases are not accepted (write the value out)")
        seen.add(id(node))
        if depth > MAX_DEPTH:
            raise YamlError(f"{source}: {_line(node)}nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, yaml.MappingNode):
            keys: set[tuple[str, str]] = set()
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.tag == "tag:yaml.org,2002:merge":
                        raise YamlError(f"{source}: {_line(k)}YAML merge keys (<<) are not accepted")
                    ident = (k.tag, k.value)
                    if ident in keys:
                        raise YamlError(f"{source}: {_line(k)}duplicate key {k.value!r}")
                    keys.add(ident)
                stack.append((k, depth + 1))
                stack.append((v, depth + 1))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, depth + 1) for item in node.value)


def _pairs(source: str):
    def hook(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise YamlError(f"{source}: duplicate key {k!r}")
            out[k] = v
        return out
    return hook


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _depth(doc, source: str) -> None:
    stack = [(doc, 1)]
    while stack:
        v, d = stack.pop()
        if d > MAX_DEPTH:
            raise YamlError(f"{source}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)


def _load_json(text: str, source: str) -> Any:
    """A JSON document (it is YAML too, but tabs and number forms differ): the json module,
    with the same refusals (duplicate keys, depth) and no NaN or Infinity."""
    import json

    try:
        doc = json.loads(text, object_pairs_hook=_pairs(source), parse_constant=_no_constant)
    except YamlError:
        raise
    except RecursionError:
        raise YamlError(f"{source}: nested too deeply") from None
    except ValueError as e:
        where = f"line {e.lineno}: " if hasattr(e, "lineno") else ""
        raise YamlError(f"{source}: {where}not valid JSON: {getattr(e, 'msg', e)}") from None
    _depth(doc, source)
    return doc


def load_yaml(text: str | bytes, source: str = "document") -> Any:
    """The one document in ``text`` as plain Python data (None for an empty document)."""
    return _load(text, source, multi=False)


def load_yaml_all(text: str | bytes, source: str = "document") -> list:
    """Every ``---``-separated document in ``text`` (empty ones left out), each checked alike."""
    return _load(text, source, multi=True)


def _load(text: str | bytes, source: str, multi: bool):
    if len(text) > MAX_BYTES:
        raise YamlError(f"{source}: larger than {MAX_BYTES >> 20} MiB")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise YamlError(f"{source}: not UTF-8 text (byte {e.start})") from None
    if text.lstrip().startswith(("{", "[")):
        doc = _load_json(text, source)
        return [doc] if multi else doc
    loader = _Loader(text)
    try:
        if multi:
            out = []
            while loader.check_node():
                node = loader.get_node()
                _check(node, source)
                doc = loader.construct_document(node)
                if doc is not None:
                    out.append(doc)
            return out
        node = loader.get_single_node()
        if node is None:
            return None
        _check(node, source)
        return loader.construct_document(node)
    except YamlError:
        raise
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or getattr(e, "context", None) or type(e).__name__
        raise YamlError(f"{source}: {where}not valid YAML or JSON: {problem}") from None
    except RecursionError:
        raise YamlError(f"{source}: nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as e:
        # the constructor turning a scalar into a value (a timestamp out of range, ...)
        raise YamlError(f"{source}: {type(e).__name__}: {str(e)[:200]}") from None
    finally:
        loader.dispose()
