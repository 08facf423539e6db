"""docs/configuration.md, written from the job spec's JSON Schema: ``python -m orchestrator.schema_doc``.

The reference is generated, never edited by hand, so it cannot drift from the models; a test compares the
committed file with this module's output.
"""
from __future__ import annotations

import json
import sys

__all__ = ["render"]

_HEADER = """# Job spec reference

Generated from the JSON Schema of `orchestrator.spec.JobSpec` by `python -m orchestrator.schema_doc`
(`make docs`); do not edit by hand. `slimray spec schema` prints the schema itself and
`slimray spec check SPEC.yaml` validates a spec without running it.

A spec is YAML. Unknown keys are errors, and every problem is reported at once, one line each with its
path (`train.lr: must be < 1, got 5`). Only `name` is required.
"""


def _resolve(schema: dict, defs: dict) -> dict:
    while "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _type(schema: dict, defs: dict) -> str:
    schema = _resolve(schema, defs)
    if "anyOf" in schema:
        kinds = [_type(s, defs) for s in schema["anyOf"]]
        return " or ".join(dict.fromkeys(k for k in kinds if k != "null")) + (
            " or null" if "null" in kinds else "")
    if "enum" in schema:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    kind = schema.get("type", "object")
    if kind == "array":
        return f"list of {_type(schema.get('items', {}), defs)}"
    return {"integer": "integer", "number": "number", "string": "string", "boolean": "boolean",
            "null": "null"}.get(kind, schema.get("title", kind))


def _bounds(schema: dict, defs: dict) -> str:
    schema = _resolve(schema, defs)
    out = []
    for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"),
                      ("minItems", "items ≥"), ("maxItems", "items ≤"), ("minLength", "length ≥")):
        if key in schema:
            out.append(f"{sign} {schema[key]}")
    for alt in schema.get("anyOf", []):
        inner = _bounds(alt, defs)
        if inner:
            out.append(inner)
    return ", ".join(out)


def _default(field: dict) -> str:
    if "default" not in field:
        return "required"
    return f"`{json.dumps(field['default'])}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;")


def _table(model: dict, defs: dict) -> list[str]:
    lines = ["| field | type | default | bounds | description |", "|---|---|---|---|---|"]
    for name, field in model.get("properties", {}).items():
        lines.append(f"| `{name}` | {_type(field, defs)} | {_cell(_default(field))} | "
                     f"{_cell(_bounds(field, defs))} | {_cell(field.get('description', ''))} |")
    return lines


def _search(section: dict) -> list[str]:  # the space's own schema: sections of knobs
    lines = ["| knob | what a value may be |", "|---|---|"]
    for name, body in section["properties"].items():
        if "properties" not in body:  # a setting of the whole search (warm_start), not a section of knobs
            lines.append(f"| `{name}` | {_cell(body.get('description', ''))} |")
            continue
        for key, knob in body["properties"].items():
            lines.append(f"| `{name}.{key}` | {_cell(knob['description'])} |")
    return lines


def render() -> str:
    """The whole reference as Markdown."""
    from orchestrator.spec import JobSpec

    schema = JobSpec.model_json_schema()
    defs = schema.get("$defs", {})
    out = [_HEADER, "## Top level", "", _cell(schema.get("description", "")), ""]
    sections = []
    top = {"properties": {}}
    for name, field in schema["properties"].items():
        target = _resolve(field, defs)
        if target.get("type", "object") == "object" and "properties" in target:
            sections.append((name, field, target))
        else:
            top["properties"][name] = field
    out += _table(top, defs) + [""]
    for name, field, target in sections:
        out += [f"## `{name}`", ""]
        description = field.get("description") or target.get("description", "")
        if description:
            out += [_cell(description), ""]
        out += (_search(target) if name == "search" else _table(target, defs)) + [""]
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
