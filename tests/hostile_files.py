"""A corpus of hostile and malformed files, for every entry point that opens a file.

`build_corpus(folder, marker)` writes each entry and returns {name: path}. Every live payload, if it ever ran,
would create `marker`: a test asserts that it never exists.
"""
import io
import json
import os
import pickle
import struct
import zipfile

import numpy as np
import torch


class Payload:
    """Unpickling this runs a shell command (what a hostile checkpoint does)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class EvalPayload(Payload):
    def __reduce__(self):
        return eval, (f"__import__('os').system({self.command!r})",)


class ExecPayload(Payload):
    def __reduce__(self):
        return exec, (f"import os; os.system({self.command!r})",)


def _torch_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _zip_bomb(inflated_bytes):
    """A torch-like zip whose data record inflates from a few hundred KB to `inflated_bytes`."""
    buffer = io.BytesIO()
    source = zipfile.ZipFile(io.BytesIO(_torch_bytes({"w": torch.zeros(4)})))
    with zipfile.ZipFile(buffer, "w") as out:
        for name in source.namelist():
            if name.endswith("/data/0"):
                out.writestr(name, bytes(inflated_bytes), compress_type=zipfile.ZIP_DEFLATED)
            else:
                out.writestr(name, source.read(name))
    return buffer.getvalue()


def _legacy_declaring_8gb():
    """torch's pre-1.6 (non-zip) format whose pickle declares an 8 GB storage for 16 bytes of data."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue().replace(b"cpuq\x06K\x04N", b"cpuq\x06J" + struct.pack("<i", 2_000_000_000) + b"N", 1)


def _safetensors_huge_header():
    return struct.pack("<Q", 2 ** 40) + b"{}"


def _safetensors_out_of_bounds():
    header = json.dumps({"w": {"dtype": "F32", "shape": [2 ** 30], "data_offsets": [0, 2 ** 32]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(16)


def _png():
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, format="PNG")
    return buffer.getvalue()


CORPUS_NAMES = [f"pickle_protocol_{p}.pt" for p in range(6)] + [
    "torch_zip_payload.ckpt", "embedding_payload.pt", "lightning_payload.ckpt", "eval_payload.pt", "exec_payload.pt",
    "numpy_object_array.pt", "empty.ckpt", "garbage.pt", "text.ckpt", "truncated_zip.ckpt", "png_named_pt.pt",
    "zip_bomb.pt", "legacy_declaring_8gb.pt", "huge_header.safetensors", "out_of_bounds.safetensors", "json.safetensors", "fifo.pt",
    "directory.ckpt", "dev_zero.ckpt"]


def build_corpus(folder, marker):
    """Write the corpus into `folder`; -> {name: path}. `marker` is created by any payload that runs."""
    os.makedirs(folder, exist_ok=True)
    command = f"touch {marker}"
    live = Payload(command)
    good_tensors = {"w": torch.zeros(2)}
    entries = {}
    for protocol in (0, 1, 2, 3, 4, 5):
        entries[f"pickle_protocol_{protocol}.pt"] = pickle.dumps({"state_dict": live}, protocol=protocol)
    entries.update({
        "torch_zip_payload.ckpt": _torch_bytes({"state_dict": good_tensors, "x": live}),
        "embedding_payload.pt": _torch_bytes({"string_to_token": {"*": torch.tensor(265)},
                                              "string_to_param": {"*": live}}),
        "lightning_payload.ckpt": _torch_bytes({"global_step": 3, "epoch": 0, "state_dict": good_tensors,
                                                "optimizer_states": [live]}),
        "eval_payload.pt": pickle.dumps({"a": EvalPayload(command)}, protocol=2),
        "exec_payload.pt": _torch_bytes({"a": ExecPayload(command)}),
        "numpy_object_array.pt": _torch_bytes({"a": np.array([live], dtype=object)}),
        "empty.ckpt": b"",
        "garbage.pt": bytes(range(256)) * 40,
        "text.ckpt": b"not a checkpoint\n" * 10,
        "truncated_zip.ckpt": _torch_bytes({"state_dict": {"w": torch.randn(64, 64)}})[:3000],
        "png_named_pt.pt": _png(),
        "zip_bomb.pt": _zip_bomb(300 * 2 ** 20),
        "legacy_declaring_8gb.pt": _legacy_declaring_8gb(),
        "huge_header.safetensors": _safetensors_huge_header(),
        "out_of_bounds.safetensors": _safetensors_out_of_bounds(),
        "json.safetensors": b'{"w": 1}',
    })
    paths = {}
    for name, data in entries.items():
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(data)
        paths[name] = path
    fifo = os.path.join(folder, "fifo.pt")
    if hasattr(os, "mkfifo"):
        os.mkfifo(fifo)
        paths["fifo.pt"] = fifo
    directory = os.path.join(folder, "directory.ckpt")
    os.makedirs(directory)
    paths["directory.ckpt"] = directory
    if os.path.exists("/dev/zero"):
        link = os.path.join(folder, "dev_zero.ckpt")
        os.symlink("/dev/zero", link)
        paths["dev_zero.ckpt"] = link
    return paths
