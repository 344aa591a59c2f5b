"""The QueueConsumer CRD, generated from the models (resource.py): `make crds` writes crds/ and
the Helm chart's template of it (charts/luaq/templates/crd-queueconsumers.yaml).

Pydantic's JSON schema becomes a structural OpenAPI v3 schema: references inlined, camelCase
property names, optional fields without `null`, durations and quantities as int-or-string,
free-form maps preserved. A shape this module does not know stops the generation, so a model
change cannot slip into the CRD half-translated.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .resource import (
    CRD_VERSION,
    GROUP,
    KIND,
    PLURAL,
    QueueConsumerSpec,
    QueueConsumerStatus,
    camel,
    int_or_string,
)

NAME = f"{PLURAL}.{GROUP}"
FILENAME = f"{NAME}.yaml"

_KEPT = {
    "type", "description", "enum", "pattern", "minimum", "maximum", "minLength", "maxLength",
    "minItems", "maxItems", "minProperties", "maxProperties", "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}  # fmt: skip
_DROPPED = {"title", "additionalProperties", "default", "properties", "items", "required", "$defs"}
# An int-or-string keeps the bounds of both branches: the API server checks `minimum` and
# `maximum` on an integer and `pattern` and `maxLength` on a string, without a CEL rule (whose
# cost it estimates from the largest value a field may hold).
_NUMBER_BOUNDS = {"minimum", "maximum"}
_STRING_BOUNDS = {"pattern", "maxLength"}


class SchemaError(Exception):
    pass


def _resolve(node: Mapping[str, Any], defs: Mapping[str, Any]) -> dict[str, Any]:
    if "$ref" not in node:
        return dict(node)
    target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def structural(node: Mapping[str, Any], defs: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """One node of pydantic's JSON schema as a structural schema node."""
    node = _resolve(node, defs)
    if "anyOf" in node:
        options = [_resolve(option, defs) for option in node["anyOf"]]
        options = [option for option in options if option.get("type") != "null"]
        outer = {k: v for k, v in node.items() if k != "anyOf"}
        if len(options) == 1:
            return structural({**options[0], **outer}, defs, where)
        types = sorted(str(option.get("type")) for option in options)
        if types in (["integer", "string"], ["number", "string"]):
            result = {
                "x-kubernetes-int-or-string": True,
                **{k: v for k, v in outer.items() if k in _KEPT},
            }
            for option in options:
                kept = _STRING_BOUNDS if option["type"] == "string" else _NUMBER_BOUNDS
                result.update({k: v for k, v in option.items() if k in kept})
            if outer.get("default") is not None:
                result["default"] = int_or_string(outer["default"])
            return result
        raise SchemaError(f"{where or '.'}: cannot express anyOf {types} structurally")
    if "const" in node:  # a Literal of one value
        node = {**{k: v for k, v in node.items() if k != "const"}, "enum": [node["const"]]}
    unknown = set(node) - _KEPT - _DROPPED
    if unknown:
        raise SchemaError(f"{where or '.'}: unknown schema keywords {sorted(unknown)}")
    result = {k: v for k, v in node.items() if k in _KEPT}
    if "description" in result:
        result["description"] = " ".join(str(result["description"]).split())
    kind = node.get("type")
    if kind is None:  # Any
        return {**result, "x-kubernetes-preserve-unknown-fields": True}
    if kind == "object":
        properties = node.get("properties")
        extra = node.get("additionalProperties")
        if properties is not None:
            result["properties"] = {
                camel(name): structural(value, defs, f"{where}.{camel(name)}")
                for name, value in properties.items()
            }
            if node.get("required"):
                result["required"] = [camel(name) for name in node["required"]]
        elif isinstance(extra, dict) and extra:
            result["additionalProperties"] = structural(extra, defs, f"{where}.*")
        else:
            result["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        result["items"] = structural(node.get("items", {}), defs, f"{where}[]")
    default = node.get("default")
    if default is not None and not isinstance(default, dict) and default != []:
        result["default"] = default
    return result


def _schema(model: type[Any]) -> dict[str, Any]:
    raw = model.model_json_schema()
    return structural(raw, raw.get("$defs", {}), camel(model.__name__))


def spec_schema() -> dict[str, Any]:
    """The camelCase schema of `spec`: the CRD's, and the operator's guide to its fields."""
    return _schema(QueueConsumerSpec)


# The name becomes the Service's `<name>-metrics` (a DNS-1035 label of at most 63 characters)
# and a label value. `name` is the one field of `metadata` a CRD's schema may restrict.
METADATA = {
    "type": "object",
    "properties": {
        "name": {
            "type": "string",
            "maxLength": 55,
            "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$",
            "description": "at most 55 lowercase letters, digits and '-', starting with a letter",
        }
    },
}

PRINTER_COLUMNS = [
    {"name": "Queue", "type": "string", "jsonPath": ".spec.queue"},
    {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Backlog", "type": "integer", "jsonPath": ".status.backlog"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    """A new document each time: a caller may change it."""
    return copy.deepcopy(_crd())


def _crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": NAME, "labels": {"app.kubernetes.io/part-of": "luaq"}},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["qc"],
                "categories": ["luaq"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": CRD_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "Workers running a Lua handler on a queue.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": METADATA,
                                "spec": spec_schema(),
                                "status": _schema(QueueConsumerStatus),
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = "# Generated by `make crds` from luaq.operator.resource: do not edit.\n"
CHART_TEMPLATE = "crd-queueconsumers.yaml"


def render() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=100)


def chart_template(definition: Mapping[str, Any] | None = None) -> str:
    """The chart's template of the CRD (`definition`, by default this one): its spec as crds/
    has it, installed and upgraded with the release unless `crds.install` is false, kept when
    the release goes unless `crds.keep` is false (helm.sh/resource-policy: keep), and labelled
    as the release's. A template, not the chart's crds/ directory: Helm installs that once and
    never upgrades it."""
    definition = crd() if definition is None else definition
    body = yaml.safe_dump({"spec": definition["spec"]}, sort_keys=False, width=100)
    if "{{" in body or "}}" in body:
        raise SchemaError("the CRD's spec holds '{{' or '}}', which Helm would read as template")
    name = definition["metadata"]["name"]
    return (
        "{{- /* Generated by `make crds` from luaq.operator.resource: do not edit. */}}\n"
        "{{- $crds := .Values.crds | default dict }}\n"
        '{{- if dig "install" true $crds }}\n'
        f"apiVersion: {definition['apiVersion']}\n"
        f"kind: {definition['kind']}\n"
        "metadata:\n"
        f"  name: {name}\n"
        "  labels:\n"
        '    {{- include "luaq.crdLabels" . | nindent 4 }}\n'
        '  {{- if dig "keep" true $crds }}\n'
        "  annotations:\n"
        "    # helm uninstall, or an upgrade with crds.install=false, leaves it in place, and\n"
        "    # with it every QueueConsumer\n"
        "    helm.sh/resource-policy: keep\n"
        "  {{- end }}\n"
        f"{body}"
        "{{- end }}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write the luaq CRDs into directories, and the Helm chart's template of them."
    )
    parser.add_argument("directories", nargs="*", type=Path, metavar="DIR")
    parser.add_argument(
        "--chart-template",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="write the chart's template of the CRD to FILE",
    )
    args = parser.parse_args(argv)
    if not args.directories and not args.chart_template:
        parser.error("nothing to write: name a DIR or a --chart-template FILE")
    text = render()
    for directory in args.directories:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / FILENAME).write_text(text, encoding="utf-8")
    template = chart_template()
    for path in args.chart_template:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
