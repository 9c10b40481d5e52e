"""Hostile and foreign files: mutated checkpoints and ONNX metadata, fed to every command that
reads them, give one line and a non-zero exit (or, for a harmless change, work), never a
traceback. The counts are printed (``pytest -s``) for the record."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch
from cli_helpers import TINY, run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ressl import train

SAFE = "safe"  # the commands may succeed (a change they do not use, or one they survive)
BAD = "bad"  # every command listed must fail


@pytest.fixture(scope="module")
def source(tmp_path_factory, image_folder):
    run = tmp_path_factory.mktemp("hostile") / "run"
    train(out=run, **dict(TINY, dataset=f"folder:{image_folder}", epochs=1, knn_every=-1))
    file = run / "last.safetensors"
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    return run, load_file(file), meta


def _checkpoint_cases(tensors, meta):
    """(name, tensors, metadata or raw bytes, expectation, commands that must fail when BAD)."""
    all_commands = ("info", "eval", "export", "resume")
    settings = json.loads(meta["settings"])
    cases = []

    def add(name, expect, t=None, m=None, commands=all_commands):
        cases.append(
            (name, tensors if t is None else t, meta if m is None else m, expect, commands)
        )

    for key in meta:
        drop = {k: v for k, v in meta.items() if k != key}
        harmless = key in (
            "ressl_version",
            "rng_device",
            "world_size",
            "metrics",
            "backbone_build",
            "epoch_health",  # absent before 0.4: the epoch's health starts empty
            "steps_per_epoch",
        )
        uses = all_commands if key in ("format", "format_version", "settings") else ("resume",)
        add(f"meta -{key}", SAFE if harmless else BAD, m=drop, commands=uses)
        for value in ("", "x", "-5", "1e400", "[]", "{}", "null", "99999999999999999999"):
            add(f"meta {key}={value}", SAFE, m={**meta, key: value})
    for key in settings:
        for value in (-1, 10**15, "abc", None, [3]):
            changed = json.dumps({**settings, key: value})
            add(f"settings {key}={value!r}", SAFE, m={**meta, "settings": changed})
    for kind in ("[1, 2]", '"text"', "3", "{"):
        add(f"settings as {kind}", BAD, m={**meta, "settings": kind})
    add("meta +extra", SAFE, m={**meta, "extra": "x"})
    add("epoch -5", BAD, m={**meta, "epoch": "-5"}, commands=("resume",))
    add("epoch beyond the plan", BAD, m={**meta, "epoch": "50"}, commands=("resume",))
    add(
        "queue_size 10**12",
        BAD,
        m={**meta, "settings": json.dumps({**settings, "queue_size": 10**12})},
    )
    add("width 100000", BAD, m={**meta, "settings": json.dumps({**settings, "width": 100000})})
    add(
        "image_size 10**6",
        BAD,
        m={**meta, "settings": json.dumps({**settings, "image_size": 10**6})},
    )
    add("channels 2", BAD, m={**meta, "settings": json.dumps({**settings, "channels": 2})})
    kinds = {
        "model.student.backbone.features.0.weight",
        "model.queue",
        "model.queue_ptr",
        "optimizer.0.momentum_buffer",
        "rng.views",
        "rng.torch",
    }
    for key in sorted(kinds):
        model = key.startswith("model.")
        commands = all_commands if model else ("resume",)
        add(
            f"tensor -{key}",
            BAD,
            t={k: v for k, v in tensors.items() if k != key},
            commands=commands,
        )
        t = tensors[key]
        for what, new in (
            ("flat", t.reshape(-1)[:1].clone() if t.numel() else t.reshape(1)),
            ("float64", t.double()),
            ("bigger", torch.zeros(t.numel() + 3, 2)),
        ):
            expect = BAD if model and key != "model.queue_ptr" or what != "float64" else SAFE
            add(
                f"tensor {key} {what}",
                expect if model else SAFE,
                t={**tensors, key: new},
                commands=commands if model else (),
            )
    add("tensor +extra", SAFE, t={**tensors, "model.extra": torch.zeros(2)})
    nan = {**tensors}
    nan["model.student.head.net.0.weight"] = torch.full_like(
        nan["model.student.head.net.0.weight"], float("nan")
    )
    add("NaN student weights", BAD, t=nan, commands=("eval", "export", "resume"))
    zeros = torch.zeros_like(tensors["rng.torch"])  # the right size, not a generator state
    add("rng.torch zeros", BAD, t={**tensors, "rng.torch": zeros}, commands=("resume",))
    add(
        "queue_ptr 10**9",
        BAD,
        t={**tensors, "model.queue_ptr": torch.tensor(10**9)},
        commands=("resume",),
    )
    return cases


def _write(folder, run, tensors, meta):
    shutil.copytree(run, folder)
    save_file(tensors, folder / "last.safetensors", metadata=meta)


def _cli(capsys, command, folder, image_folder, tmp):
    args = {
        "info": ["info", folder],
        "eval": [
            "eval",
            "knn",
            folder,
            "--dataset",
            f"folder:{image_folder}",
            "--device",
            "cpu",
            "--k",
            "5",
        ],
        "export": ["export", folder, "-o", tmp / "x.onnx", "--no-verify", "--overwrite"],
        "resume": ["train", "--resume", folder, "--epochs", "2"],
    }[command]
    return run_cli(capsys, *args)


def _clean(code, err):
    """One ``ressl: error:`` line (nothing continuing it) and no traceback."""
    lines = err.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("ressl: error:")]
    if "Traceback" in err:
        return False
    if code == 0:
        return not errors
    return len(errors) == 1 and errors[0] == len(lines) - 1


@pytest.mark.slow
def test_mutated_checkpoints_give_one_line_never_a_traceback(
    capsys, tmp_path, source, image_folder
):
    run, tensors, meta = source
    counts = {"cases": 0, "runs": 0, "clean errors": 0, "worked": 0, "tracebacks": 0}
    raw = (run / "last.safetensors").read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    truncations = sorted({0, 4, 8, 9, header // 2, header - 1, header, header + 7, len(raw) - 1})
    cases = _checkpoint_cases(tensors, meta)
    cases += [
        (f"truncated at {n}", None, raw[:n], BAD, ("info", "eval", "export", "resume"))
        for n in truncations
    ]
    failures = []
    for i, (name, t, m, expect, must_fail) in enumerate(cases):
        folder = tmp_path / f"c{i}"
        if t is None:
            shutil.copytree(run, folder)
            (folder / "last.safetensors").write_bytes(m)
        else:
            _write(folder, run, t, m)
        counts["cases"] += 1
        for command in ("info", "eval", "export", "resume"):
            code, _, err = _cli(capsys, command, folder, image_folder, tmp_path)
            counts["runs"] += 1
            counts["tracebacks"] += "Traceback" in err
            counts["worked" if code == 0 else "clean errors"] += code == 0 or _clean(code, err)
            if not _clean(code, err) or (expect == BAD and command in must_fail and code == 0):
                failures.append((name, command, code, err.strip().splitlines()[-3:]))
    print("\ncheckpoint fuzz:", json.dumps(counts))
    assert not failures, failures[:10]
    assert counts["tracebacks"] == 0


def _foreign_graph(meta, channels, size):
    """A small graph that is not a ressl encoder (its output is C-d), carrying ``meta``."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["embedding"]),
        ],
        "foreign",
        [
            helper.make_tensor_value_info(
                "images", TensorProto.FLOAT, ["batch", channels, size, size]
            )
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", channels])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    return model


@pytest.mark.slow
def test_mutated_onnx_metadata_gives_one_line_never_a_traceback(
    capsys, tmp_path, source, image_folder
):
    from ressl.export import export_onnx

    run, _, _ = source
    good = tmp_path / "good.onnx"
    export_onnx(run, good, verify=False)
    proto = onnx.load(str(good))
    meta = {p.key: p.value for p in proto.metadata_props}
    cases = []
    for key in meta:
        essential = key in (
            "format",
            "format_version",
            "image_size",
            "channels",
            "mean",
            "std",
            "embedding_dim",
            "backbone",
            "weights",
            "precision",
        )
        cases.append(
            (f"-{key}", {k: v for k, v in meta.items() if k != key}, BAD if essential else SAFE)
        )
        for value in (
            "",
            "x",
            "-5",
            "0",
            "1e400",
            "[]",
            "{}",
            "null",
            "99999999999",
            "[NaN, 1, 1]",
        ):
            cases.append((f"{key}={value}", {**meta, key: value}, SAFE))
    cases += [
        ("embedding_dim +1", {**meta, "embedding_dim": str(int(meta["embedding_dim"]) + 1)}, BAD),
        ("channels 1", {**meta, "channels": "1", "mean": "[0.5]", "std": "[0.5]"}, BAD),
        ("image_size 10**6", {**meta, "image_size": "1000000"}, BAD),
    ]
    counts = {"cases": 0, "runs": 0, "clean errors": 0, "worked": 0, "tracebacks": 0}
    failures = []
    files = []
    for i, (name, m, expect) in enumerate(cases):
        del proto.metadata_props[:]
        for key, value in m.items():
            proto.metadata_props.add(key=key, value=value)
        files.append((name, tmp_path / f"m{i}.onnx", expect))
        onnx.save(proto, str(files[-1][1]))
    foreign = tmp_path / "foreign.onnx"
    onnx.save(_foreign_graph(meta, 3, 16), str(foreign))
    files.append(("a foreign graph with ressl metadata", foreign, BAD))
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files.append(("truncated", truncated, BAD))
    for name, file, expect in files:
        counts["cases"] += 1
        for command in (
            ["info", file],
            [
                "embed",
                file,
                image_folder / "test",
                "-o",
                tmp_path / "e.npz",
                "--overwrite",
                "--device",
                "cpu",
            ],
            ["eval", "knn", file, "--dataset", f"folder:{image_folder}", "--k", "5"],
        ):
            code, _, err = run_cli(capsys, *command)
            counts["runs"] += 1
            counts["tracebacks"] += "Traceback" in err
            counts["worked" if code == 0 else "clean errors"] += code == 0 or _clean(code, err)
            # eval reads any ONNX graph: one without ressl's format tags is read as foreign
            loose = command[0] == "eval" and name in ("-format", "-format_version")
            if not _clean(code, err) or (expect == BAD and code == 0 and not loose):
                failures.append((name, command[0], code, err.strip().splitlines()[-3:]))
    print("\nonnx fuzz:", json.dumps(counts))
    assert not failures, failures[:10]
    assert counts["tracebacks"] == 0


NESTED = "[" * 100_000 + "]" * 100_000  # Python's parser recursed once per level


@pytest.mark.parametrize("key", ["settings", "metrics", "optimizer"])
def test_nested_checkpoint_metadata_gives_one_line(capsys, tmp_path, source, image_folder, key):
    run, tensors, meta = source
    folder = tmp_path / "nested"
    _write(folder, run, tensors, {**meta, key: NESTED})
    uses = {
        "settings": ("info", "export", "resume"),
        "metrics": ("info", "resume"),
        "optimizer": ("resume",),
    }[key]
    for command in ("info", "export", "resume"):
        code, _, err = _cli(capsys, command, folder, image_folder, tmp_path)
        assert _clean(code, err) and "Recursion" not in err, (command, err)
        if command in uses:
            assert code == 2 and f"'{key}' nests JSON deeper than 32 levels" in err, (command, err)


@pytest.mark.parametrize("key", ["settings", "mean", "verification"])
def test_nested_onnx_metadata_gives_one_line(capsys, tmp_path, source, image_folder, key):
    from ressl.export import export_onnx

    run, _, _ = source
    file = tmp_path / "nested.onnx"
    export_onnx(run, file, verify=False)
    proto = onnx.load(str(file))
    meta = {p.key: p.value for p in proto.metadata_props}
    del proto.metadata_props[:]
    for k, v in {**meta, key: NESTED}.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(file))
    embed = ["embed", file, image_folder / "test", "-o", tmp_path / "e.npz", "--device", "cpu"]
    for command in (["info", file], embed):
        code, _, err = run_cli(capsys, *command)
        assert _clean(code, err) and "Recursion" not in err, (command[0], err)
        if command[0] == "info" or key != "verification":  # (embed does not read it)
            assert code == 2 and f"'{key}' nests JSON deeper than 32 levels" in err


def test_parse_json_bounds_depth_and_size_not_strings():
    from ressl.jsontext import MAX_JSON_DEPTH, parse_json

    deepest = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert parse_json(deepest, "x") == eval(deepest)
    with pytest.raises(ValueError, match="x nests JSON deeper than 32 levels"):
        parse_json("[" + deepest + "]", "x")
    # brackets and escaped quotes inside strings are text, not nesting
    text = json.dumps({"a": "[" * 100 + '\\"{' * 50, "b": ["]]]"]})
    assert parse_json(text, "x") == json.loads(text)
    with pytest.raises(ValueError, match="x is 12 characters of JSON; at most 10 are read"):
        parse_json('"0123456789"', "x", max_chars=10)
    with pytest.raises(ValueError, match="x is not valid JSON"):
        parse_json('{"a": [1, 2}', "x")
