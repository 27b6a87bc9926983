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
small as the text), checked, and only then constructed. Every problem is one
:class:`YamlError` line: ``<source>: line N: what``.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_DEPTH = 64
MAX_BYTES = 16 << 20

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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


def load_yaml(text: str | bytes, source: str = "document") -> Any:
    """The one document in ``text`` as plain Python data (None for an empty document)."""
    if len(text) > MAX_BYTES:
        raise YamlError(f"{source}: larger than {MAX_BYTES >> 20} MiB")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise YamlError(f"{source}: not UTF-8 text (byte {e.start})") from None
    loader = _Loader(text)
    try:
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
