"""`infer-recipes quantize`: a calibrated checkpoint. The model runs in float over a calibration text, the scaling
of `quantization.calibrate` is chosen on what it saw and folded into the weights, and the result is written as a
model directory that `LLM(DIR)`, recipes and `serve` load like any other, in the scheme it was calibrated for:

    DIR/model.safetensors        the scaled weights, bfloat16, checkpoint names (transformers reads it too),
                                 and model.safetensors.index.json naming it as the model's only file
    DIR/config.json, tokenizer.json, tokenizer_config.json (the chat template)
    DIR/quantization.json        scheme, group size, skipped modules, method, the alpha of every group, the
                                 calibration text's sha256 and size, the output error before and after
    DIR/smoothing.safetensors    the factors folded in, per group (for inspection; loading never needs them)
    DIR/int4.safetensors         with --gptq only: GPTQ's int4 codes (two per byte), scales and zeros per linear,
                                 which loading uses as they are; model.safetensors then holds the decoder weights
                                 those codes compute (the lm_head's float weight, the embedding when tied, stays)

The weights are saved in float, not in a kernel's packed form: every packed layout here depends on the torch
version and the CPU (torch's int4 layout, our native kernels' tiles), the scaled float weights do not, and rounding
them at load is the cheap part (the calibration is what is saved). GPTQ's codes are the exception: its grids are
chosen with the error correction and min-max rounding at load cannot find them again, so they are saved plainly
(codes, scales, zeros) and packed at load like any other int4 weight. The converted-model cache then maps the packed
form on every later load.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import sys
import time

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from .errors import InferRecipesError
from .loading import resolve_model_source
from .loading.hf import QUANTIZATION_FILE, read_quantization, write_config
from .quantization import calibrate as cal
from .quantization import gptq
from .tokenizer import to_directory

SAVE_DTYPE = torch.bfloat16
ROWS = 512  # activation rows per group the scale search scores on
CODES_FILE = "int4.safetensors"  # GPTQ's int4 codes, scales and zeros per linear (checkpoint names)


def windows(ids: list[int], samples: int, seq_len: int) -> list[list[int]]:
    """`samples` windows of `seq_len` tokens spread evenly over the text (fewer when it is short)."""
    whole = len(ids) // seq_len
    if whole == 0:
        raise InferRecipesError(f"the calibration text has {len(ids)} tokens, less than one window of {seq_len}: "
                                "give a longer text or a smaller --seq-len")
    n = min(samples, whole)
    starts = [round(i * (whole - 1) / max(n - 1, 1)) * seq_len for i in range(n)]
    return [ids[s:s + seq_len] for s in starts]


def _read_calibration(path: str) -> tuple[str, str]:
    """The calibration text and its sha256."""
    if not os.path.isfile(path):
        raise InferRecipesError(f"calibration file {path} not found: pass a plain-text file (e.g. ptb.valid.txt)")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InferRecipesError(f"{path} is not UTF-8 text ({e}): pass a plain-text file") from None
    return text, hashlib.sha256(raw).hexdigest()


def _check_out(out: str) -> None:
    if os.path.isfile(out):
        raise InferRecipesError(f"--out {out} is a file: give a directory to write the checkpoint into")
    if os.path.isdir(out) and os.listdir(out) and read_quantization(out) is None:
        raise InferRecipesError(f"--out {out} is not empty and holds no checkpoint of ours: choose a new or empty "
                                "directory (an earlier `quantize` output there is replaced)")


def made_from(out: str, model: str, scheme: str, calibration: str, samples: int = 32, seq_len: int = 512,
              group_size: int = 32, use_gptq: bool = False) -> bool:
    """Whether `out` already holds the checkpoint `quantize_checkpoint` would make of these arguments (no modules
    skipped; the calibration text compared by its sha256): a caller may load it instead of calibrating again."""
    report = read_quantization(out) if os.path.isdir(out) else None
    if not report or not os.path.isfile(calibration):
        return False
    c = report.get("calibration", {})
    return ((report.get("source_model"), report.get("scheme"), report.get("group_size"),
             report.get("quantization_skip"), c.get("samples"), c.get("seq_len"), "int4_codes" in report,
             c.get("sha256"))
            == (model, scheme, group_size, [], samples, seq_len, use_gptq, _read_calibration(calibration)[1]))


def quantize_checkpoint(model: str, scheme: str, calibration: str, out: str, samples: int = 32, seq_len: int = 512,
                        group_size: int = 32, skip: tuple[str, ...] = (), progress: bool = True,
                        use_gptq: bool = False) -> dict:
    """Calibrates `model` for `scheme` on the text file `calibration` and writes the checkpoint to `out`;
    `use_gptq` (int4 only): after the scaling, GPTQ rounds the decoder linears and the lm_head and
    their codes are saved.
    Returns the report quantization.json holds."""
    from .engine.llm import LLM

    if scheme not in cal.CALIBRATED:
        raise InferRecipesError(f"calibration exists for {', '.join(cal.CALIBRATED)}, not {scheme!r}")
    if samples < 1 or seq_len < 16:
        raise InferRecipesError("--samples must be at least 1 and --seq-len at least 16")
    if use_gptq and scheme != "int4":
        raise InferRecipesError(f"GPTQ rounds to int4 here: use --scheme int4, not {scheme!r}, with --gptq")
    _check_out(out)
    source = resolve_model_source(model)
    if source.kind == "hf" and read_quantization(source.location) is not None:
        raise InferRecipesError(f"{model} is already a calibrated checkpoint: calibrate the model it came from")
    text, digest = _read_calibration(calibration)
    start = time.perf_counter()
    llm = LLM(model, device="cpu", dtype="float32", max_model_len=seq_len + 1, max_batch_size=1, fusion=False,
              kernels="torch", prefix_caching=False, quantization_skip=tuple(skip), progress=progress)
    net = llm.model
    found = cal.groups(net, skip)
    chunks = windows(llm.tokenizer.encode(text), samples, seq_len)
    tokens = len(chunks) * seq_len
    recorder = cal.Recorder(net, found, max_rows=ROWS, tokens=tokens)
    try:
        for ids in tqdm(chunks, desc="calibrating", unit="window", disable=not progress, file=sys.stderr):
            llm.logits(ids)
    finally:
        recorder.close()
    factors, choices = cal.search(net, found, scheme, group_size, progress=progress)
    cal.apply(net, found, factors)
    for g in found:
        g.rows = None
    rounded = {}
    if use_gptq:
        def run_text():
            for ids in tqdm(chunks, desc="collecting Hessians", unit="window", disable=not progress,
                            file=sys.stderr, leave=False):
                llm.logits(ids)

        # each window's next tokens, in the order its rows reach the lm_head (the last row has none)
        targets = torch.tensor([t for ids in chunks for t in ids[1:] + [-100]])
        rounded = gptq.quantize_model(net, run_text, group_size, skip, progress=progress, targets=targets)
    report = {
        "format": 1, "scheme": scheme, "group_size": group_size, "quantization_skip": list(skip),
        "method": "smoothquant" if scheme == "w8a8" else "activation-aware scaling (AWQ)" + (
            " + GPTQ" if use_gptq else ""),
        "source_model": model, "weights_dtype": str(SAVE_DTYPE).removeprefix("torch."),
        "calibration": {"file": os.path.basename(calibration), "sha256": digest, "windows": len(chunks),
                        "samples": samples, "seq_len": seq_len, "tokens": tokens},
        "alpha": {c.group: c.alpha for c in choices},
        "output_error": {"unscaled": sum(c.error_unscaled for c in choices),
                         "scaled": sum(c.error for c in choices)},
        "by_kind": _by_kind(choices),
    }
    if rounded:
        report["int4_codes"] = CODES_FILE
        report["gptq"] = {"linears": len(rounded), "output_error": {
            "round_to_nearest": sum(r.error_rtn for r in rounded.values()),
            "gptq": sum(r.error for r in rounded.values())}, "by_kind": _gptq_by_kind(rounded)}
    _save(llm, out, report, factors, rounded, progress)
    report["seconds"] = time.perf_counter() - start
    return report


def _by_kind(choices: list[cal.Choice]) -> dict:
    """Per group kind (attn, mlp, down): the median alpha and the output error scaled / unscaled."""
    kinds: dict[str, list[cal.Choice]] = {}
    for c in choices:
        kinds.setdefault(c.group.rsplit(".", 1)[1], []).append(c)
    return {k: {"median_alpha": statistics.median(c.alpha for c in cs),
                "error_ratio": sum(c.error for c in cs) / max(sum(c.error_unscaled for c in cs), 1e-30)}
            for k, cs in kinds.items()}


def _gptq_by_kind(rounded: dict[str, gptq.Rounded]) -> dict:
    """Per linear kind (q_proj, ..., down_proj): GPTQ's output error over round-to-nearest's."""
    kinds: dict[str, list[gptq.Rounded]] = {}
    for name, r in rounded.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(r)
    return {k: sum(r.error for r in rs) / max(sum(r.error_rtn for r in rs), 1e-30) for k, rs in kinds.items()}


def _save(llm, out: str, report: dict, factors: dict[str, torch.Tensor], rounded: dict, progress: bool) -> None:
    """Writes the directory next to `out` and renames it into place: an interrupted save leaves no half model."""
    partial = f"{os.path.normpath(out)}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        tensors = {name: p.detach().to(SAVE_DTYPE).contiguous()
                   for name, p in tqdm(list(llm.model.named_parameters()), desc="saving", unit="tensor",
                                       disable=not progress, file=sys.stderr, leave=False)}
        save_file(tensors, os.path.join(partial, "model.safetensors"), metadata={"format": "pt"})
        # the index says which file holds the model (smoothing.safetensors beside it is not part of it)
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {name: "model.safetensors" for name in tensors}}
        with open(os.path.join(partial, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f)
        save_file({k: v.contiguous() for k, v in factors.items()}, os.path.join(partial, "smoothing.safetensors"))
        if rounded:  # the codes GPTQ chose, on their own grid (min-max rounding at load would not find it)
            codes = {}
            for name, r in rounded.items():
                codes.update({f"{name}.qweight": gptq.pack(r.q).contiguous(), f"{name}.scales":
                              r.scales.to(torch.bfloat16), f"{name}.zeros": r.zeros.to(torch.bfloat16)})
            save_file(codes, os.path.join(partial, CODES_FILE), metadata={"format": "pt"})
        write_config(partial, llm.model_config, report["weights_dtype"])
        to_directory(llm.tokenizer, partial)
        with open(os.path.join(partial, QUANTIZATION_FILE), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
