"""The example workflows in integrations/comfyui/example_workflows, each loaded and validated.

Every family has its workflow in ComfyUI's two formats: API (what ``POST /prompt`` takes: ``*_api.json``) and UI
(what the editor saves and loads: nodes with widget values, links, ``*_ui.json``). Always: every file parses, every
link points to a node and output that exist, each UI file holds exactly its API twin's nodes and links. In a real
ComfyUI (``COMFYUI_PATH``): each API workflow passes ``execution.validate_prompt`` (what ``POST /prompt`` runs;
the model files it names are created empty, since validation checks names only), and each UI workflow, turned
into API format with the node definitions ComfyUI serves at ``/object_info`` (widget values in input order, a
seed's ``control_after_generate`` value after it), equals its API twin.

Run as a script with ``COMFYUI_PATH`` set to rewrite the UI files from the API ones.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / "integrations" / "comfyui"
WORKFLOWS = PACK / "example_workflows"
FAMILIES = ["sd15", "sdxl", "sd3", "flux"]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
real_comfyui = pytest.mark.skipif(
    not COMFYUI_PATH or not (Path(COMFYUI_PATH) / "comfy_api" / "latest").is_dir(),
    reason="set COMFYUI_PATH to a ComfyUI checkout (v0.3.64 checked) to validate the workflows in real ComfyUI",
)
#: The model folder each loader input names a file in (ComfyUI's ``folder_paths`` names).
MODEL_INPUTS = {("CheckpointLoaderSimple", "ckpt_name"): "checkpoints", ("UNETLoader", "unet_name"): "diffusion_models",
                ("DualCLIPLoader", "clip_name1"): "text_encoders", ("DualCLIPLoader", "clip_name2"): "text_encoders",
                ("VAELoader", "vae_name"): "vae"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def api_workflows() -> dict[str, Path]:
    return {path.name[: -len("_api.json")]: path for path in sorted(WORKFLOWS.glob("*_api.json"))}


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


# ---------------------------------------------------------------------------------------------- the two formats


def widget_names(definition: dict[str, Any]) -> list[str]:
    """The node's widget values in the order the editor stores them: each widget input (required, then optional,
    in definition order), and after an input with ``control_after_generate`` that control's own value."""
    names = []
    for section in ("required", "optional"):
        for name, spec in (definition.get(section) or {}).items():
            kind, options = spec[0], spec[1] if len(spec) > 1 else {}
            if (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput"):
                names.append(name)
                if options.get("control_after_generate"):
                    names.append(f"{name}::control_after_generate")
    return names


def ui_to_api(ui: dict[str, Any], definitions: dict[str, dict]) -> dict[str, Any]:
    """What the editor queues for a UI workflow: each node's linked inputs and its widget values by name."""
    links = {link[0]: link for link in ui["links"]}
    out = {}
    for node in ui["nodes"]:
        inputs: dict[str, Any] = {}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, source, output, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(source), output]
        names = widget_names(definitions[node["type"]])
        values = node.get("widgets_values", [])
        if len(names) != len(values):
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values for {names}")
        inputs.update({n: v for n, v in zip(names, values) if not n.endswith("::control_after_generate")})
        out[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return out


def api_to_ui(api: dict[str, Any], definitions: dict[str, dict], outputs: dict[str, list[str]]) -> dict[str, Any]:
    """The editor's format of an API workflow (nodes in columns by depth, links numbered in input order)."""
    depth: dict[str, int] = {}

    def level(node_id: str) -> int:
        if node_id not in depth:
            parents = [v[0] for v in api[node_id]["inputs"].values() if is_link(v)]
            depth[node_id] = 1 + max((level(p) for p in parents), default=-1)
        return depth[node_id]

    ids = sorted(api, key=lambda i: (level(i), int(i)))
    links, nodes, rows = [], [], {}
    for order, node_id in enumerate(ids):
        node = api[node_id]
        kind, inputs = node["class_type"], node["inputs"]
        slots, values = [], []
        for name in widget_names(definitions[kind]):
            if name.endswith("::control_after_generate"):
                values.append("fixed")
            else:
                values.append(inputs[name])
        for name, value in inputs.items():
            if is_link(value):
                links.append([len(links) + 1, int(value[0]), value[1], int(node_id), len(slots),
                              outputs[api[value[0]]["class_type"]][value[1]]])
                slots.append({"name": name, "type": links[-1][5], "link": links[-1][0]})
        row = rows.setdefault(level(node_id), 0)
        rows[level(node_id)] += 1
        nodes.append({"id": int(node_id), "type": kind, "pos": [60 + 380 * level(node_id), 80 + 260 * row],
                      "size": [340, 220], "flags": {}, "order": order, "mode": 0, "inputs": slots,
                      "outputs": [], "properties": {"Node name for S&R": kind}, "widgets_values": values})
    for node in nodes:
        for index, kind in enumerate(outputs[node["type"]]):
            used = [link[0] for link in links if link[1] == node["id"] and link[2] == index]
            node["outputs"].append({"name": kind, "type": kind, "links": used, "slot_index": index})
    return {"last_node_id": max(int(i) for i in api), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


# ---------------------------------------------------------------------------------------------- always


def test_every_family_has_api_and_ui_workflows():
    names = set(api_workflows())
    assert {f"memguard_{family}" for family in FAMILIES} <= names
    for name in names:
        assert (WORKFLOWS / f"{name}_ui.json").is_file(), name


@pytest.mark.parametrize("name", sorted(api_workflows()))
def test_workflow_links_are_consistent(name):
    """API links name existing nodes; the UI file holds the same nodes and links; each workflow samples through a
    memguard node and shows its report in a PreviewAny."""
    api, ui = load(WORKFLOWS / f"{name}_api.json"), load(WORKFLOWS / f"{name}_ui.json")
    for node_id, node in api.items():
        for value in node["inputs"].values():
            assert not is_link(value) or value[0] in api, (node_id, value)
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {i: n["class_type"] for i, n in api.items()}
    api_links = sorted((v[0], v[1], i, k) for i, n in api.items() for k, v in n["inputs"].items() if is_link(v))
    slots = {(n["id"], s["link"]): s["name"] for n in ui["nodes"] for s in n.get("inputs", [])}
    ui_links = sorted((str(a), b, str(c), slots[(c, link)]) for link, a, b, c, _, _ in ui["links"])
    assert ui_links == api_links
    kinds = {n["class_type"] for n in api.values()}
    assert kinds & {"MemguardGuardedKSampler", "MemguardMemorizationGuard"} and "PreviewAny" in kinds
    guard = next(i for i, n in api.items() if n["class_type"].startswith("Memguard"))
    preview = next(n for n in api.values() if n["class_type"] == "PreviewAny")
    assert preview["inputs"]["source"] == [guard, 2]  # the report output


# ---------------------------------------------------------------------------------------------- real ComfyUI


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    import comfy_twins as twins

    scratch = tmp_path_factory.mktemp("workflows")
    comfy = twins.import_comfyui(COMFYUI_PATH)
    twins.load_pack_like_comfyui(comfy, str(PACK), str(scratch))
    import folder_paths

    for workflow in api_workflows().values():  # the files the loaders name, empty: validation checks names only
        for node in load(workflow).values():
            for name, value in node["inputs"].items():
                folder = MODEL_INPUTS.get((node["class_type"], name))
                if folder is not None:
                    (scratch / folder).mkdir(exist_ok=True)
                    (scratch / folder / value).touch()
                    folder_paths.add_model_folder_path(folder, str(scratch / folder))
    return comfy


def definitions_of(comfy: dict[str, Any]) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """Each node type's input definitions and output types, as ``/object_info`` serves them."""
    mappings = comfy["nodes"].NODE_CLASS_MAPPINGS
    inputs = {kind: cls.INPUT_TYPES() for kind, cls in mappings.items()}
    outputs = {kind: list(getattr(cls, "RETURN_TYPES", ()) or ()) for kind, cls in mappings.items()}
    return inputs, outputs


@real_comfyui
@pytest.mark.parametrize("name", sorted(api_workflows()))
def test_api_workflow_validates_in_real_comfyui(comfy, name):
    import asyncio

    api = load(WORKFLOWS / f"{name}_api.json")
    valid, error, outputs, node_errors = asyncio.run(comfy["execution"].validate_prompt("check", api, None))
    assert valid, (error, node_errors)
    kinds = {api[node]["class_type"] for node in outputs}
    assert {"SaveImage", "PreviewAny"} <= kinds


@real_comfyui
@pytest.mark.parametrize("name", sorted(api_workflows()))
def test_ui_workflow_is_its_api_twin_in_real_comfyui(comfy, name):
    definitions, _ = definitions_of(comfy)
    ui = load(WORKFLOWS / f"{name}_ui.json")
    assert ui_to_api(ui, definitions) == load(WORKFLOWS / f"{name}_api.json")


def main() -> None:
    """Rewrite the UI workflows from the API ones (needs ``COMFYUI_PATH``)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import comfy_twins as twins

    comfy = twins.import_comfyui(os.environ["COMFYUI_PATH"])
    import tempfile

    twins.load_pack_like_comfyui(comfy, str(PACK), tempfile.mkdtemp())
    definitions, outputs = definitions_of(comfy)
    for name, path in api_workflows().items():
        ui = api_to_ui(load(path), definitions, outputs)
        (WORKFLOWS / f"{name}_ui.json").write_text(json.dumps(ui, indent=1) + "\n")
        print(f"wrote {name}_ui.json")


if __name__ == "__main__":
    main()
