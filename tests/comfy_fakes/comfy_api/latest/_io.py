"""Fake of the subset of ComfyUI v0.3.64's ``comfy_api/latest/_io.py`` that memguard's nodes use.

Same names, signatures and behaviour where the nodes depend on them: typed inputs/outputs with
``Input``/``Output`` inner classes, ``Schema``, ``Hidden`` (no prompt id in v0.3.64), ``HiddenHolder``,
``ComfyNode`` (classmethods, ``hidden`` set on a per-call clone) and ``NodeOutput``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class Input:
    def __init__(
        self,
        id: str,
        display_name: str | None = None,
        optional: bool = False,
        tooltip: str | None = None,
        lazy: bool | None = None,
        extra_dict: dict | None = None,
        **widget: Any,
    ) -> None:
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.lazy = lazy
        self.widget = widget


class Output:
    def __init__(
        self,
        id: str | None = None,
        display_name: str | None = None,
        tooltip: str | None = None,
        is_output_list: bool = False,
    ) -> None:
        self.id = id
        self.display_name = display_name
        self.tooltip = tooltip
        self.is_output_list = is_output_list


def _type(io_type: str) -> type:
    input_cls = type("Input", (Input,), {"io_type": io_type})
    output_cls = type("Output", (Output,), {"io_type": io_type})
    return type(io_type.title(), (), {"io_type": io_type, "Input": input_cls, "Output": output_cls})


Boolean = _type("BOOLEAN")
Int = _type("INT")
Float = _type("FLOAT")
String = _type("STRING")
Model = _type("MODEL")
Clip = _type("CLIP")
Conditioning = _type("CONDITIONING")
Latent = _type("LATENT")


class Combo:
    io_type = "COMBO"

    class Input(Input):
        io_type = "COMBO"

        def __init__(
            self,
            id: str,
            options: list[str] | None = None,
            display_name: str | None = None,
            optional: bool = False,
            tooltip: str | None = None,
            lazy: bool | None = None,
            default: str | None = None,
            **widget: Any,
        ) -> None:
            super().__init__(id, display_name, optional, tooltip, lazy, default=default, **widget)
            self.options = list(options or [])
            self.default = default

    class Output(Output):
        io_type = "COMBO"


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"
    auth_token_comfy_org = "AUTH_TOKEN_COMFY_ORG"
    api_key_comfy_org = "API_KEY_COMFY_ORG"


class HiddenHolder:
    def __init__(self, unique_id: str | None = None, prompt: Any = None, **kwargs: Any) -> None:
        self.unique_id = unique_id
        self.prompt = prompt

    def __getattr__(self, key: str) -> Any:
        return None

    @classmethod
    def from_dict(cls, d: dict | None) -> HiddenHolder:
        d = d or {}
        return cls(unique_id=d.get(Hidden.unique_id), prompt=d.get(Hidden.prompt))


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list[Input] | None = None
    outputs: list[Output] | None = None
    hidden: list[Hidden] | None = None
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False

    def validate(self) -> None:
        ids = [i.id for i in self.inputs or []] + [o.id for o in self.outputs or [] if o.id is not None]
        if len(ids) != len(set(ids)):
            raise ValueError(f"ids must be unique: {ids}")


class NodeOutput:
    def __init__(self, *args: Any, ui: Any = None, expand: dict | None = None, block_execution: str | None = None):
        self.args = args
        self.ui = ui
        self.expand = expand
        self.block_execution = block_execution

    @property
    def result(self) -> tuple | None:
        return self.args if len(self.args) > 0 else None

    def __getitem__(self, index: int) -> Any:
        return self.args[index]


class ComfyNode:
    hidden: HiddenHolder | None = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs: Any) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls) -> Schema:  # noqa: N802 (ComfyUI's name)
        schema = cls.define_schema()
        schema.validate()
        return schema

    @classmethod
    def PREPARE_CLASS_CLONE(cls, hidden_inputs: dict) -> type[ComfyNode]:  # noqa: N802 (ComfyUI's name)
        """A subclass carrying the hidden inputs, as ComfyUI's executor makes for each call."""
        return type(cls.__name__, (cls,), {"hidden": HiddenHolder.from_dict(hidden_inputs)})
