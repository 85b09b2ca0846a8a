"""A randomly initialised tiny Qwen2.5-VL (or Qwen2-VL) built offline: ``zoomgym tiny-model OUT``.

Everything a real checkpoint folder has, written with ``save_pretrained`` and reloaded with
``from_pretrained``: ``config.json`` + ``model.safetensors`` + ``generation_config.json``, a byte-level BPE
tokenizer trained here with Qwen's added tokens and chat layout (``agents.models.tokenizer``), the PIL
image processor and the image-only processor (``agents.models.processor``). Nothing comes from a hub.
Same arguments -> byte-identical files.

Sizes (parameters at the default patch 14 / merge 2, vocabulary ~1.2K; build time on 2 CPU cores
after imports):

========  ==========  ================================  ================================  ========
preset    parameters  language model                    vision tower                      build
========  ==========  ================================  ================================  ========
``1m``    0.82M       2 layers, hidden 128, 4 heads     2 blocks, hidden 64, 2 heads      ~0.3 s
``10m``   8.2M        4 layers, hidden 320, 8 heads     4 blocks, hidden 192, 4 heads     ~0.4 s
``50m``   43.6M       8 layers, hidden 512, 8 heads     8 blocks, hidden 384, 6 heads     ~1.5 s
========  ==========  ================================  ================================  ========

Default view budget: ``min_pixels = 64 * factor**2`` and ``max_pixels = 256 * factor**2`` with
``factor = patch_size * merge_size`` (224x224 .. 448x448 px, 64 .. 256 visual tokens per image at the
default factor 28): CPU-sized. Real checkpoints keep their own processor budget (MGPO uses
``256*28*28 .. 1280*28*28``); ``load_processor(..., min_pixels=, max_pixels=)`` overrides either.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TinySize:
    """Widths and depths of one tiny preset (text = language model, vision = vision tower)."""

    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    vision_intermediate: int


TINY_SIZES: dict[str, TinySize] = {
    "1m": TinySize(128, 2, 4, 2, 384, 64, 2, 2, 128),
    "10m": TinySize(320, 4, 8, 4, 960, 192, 4, 4, 512),
    "50m": TinySize(512, 8, 8, 4, 1536, 384, 8, 6, 1024),
}
"""Presets by name; the name is the rough total parameter count."""

TOY_BASE_MODEL: dict[str, Any] = {
    "size": "1m",
    "patch_size": 28,
    "merge_size": 1,
    "rope_theta": 10.0,
    "min_pixels": 224 * 224,
    "max_pixels": 224 * 224,
}
"""`build_tiny_model` arguments of the toy base (``zoomgym tiny-model OUT --preset toy-base``, and what
``zoomgym toy-base`` fine-tunes). Why each differs from the defaults:

* ``rope_theta=10``: at Qwen's 1e6 and a head size of 32 the slowest M-RoPE frequencies barely turn
  across an 8x8 grid, so the language model cannot tell where an image token sits and cannot learn
  to write a box; at 10 neighbouring tokens differ clearly in every rotary pair.
* patch 28, merge 1: one visual token per 28x28 shown pixels, as in Qwen2.5-VL, from a single patch,
  so each token sees exactly its cell (no 2x2 merge blurring neighbours for a 1M model).
* a fixed 224x224 budget: every image, view or crop, is shown at 224x224 (8x8 tokens). The synthetic
  ``cpu`` canvas (672 px) is then shown at a third of its size, where its checked patches average to
  grey (the view hides the answer), while a crop of one token's cell (96 canvas px) is shown 2.3x
  enlarged, where the checks are plain to see."""

ARCHES = ("qwen2_5_vl", "qwen2_vl")
"""Architectures ``build_tiny_model`` can build (``config.model_type``)."""


def mrope_section(head_dim: int) -> list[int]:
    """Split of the rotary frequencies over (temporal, height, width): Qwen's 16/24/24 of 64, scaled.

    ``t = half // 4``, ``h = (half - t) // 2``, ``w = half - t - h`` with ``half = head_dim // 2``, so
    ``mrope_section(128) == [16, 24, 24]`` and every axis gets at least one frequency for ``head_dim >= 8``.
    """
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _config(arch: str, size: TinySize, vocab_size: int, token_ids: dict[str, int], patch_size: int,
            merge_size: int, rope_theta: float) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = {
        "vocab_size": vocab_size,
        "hidden_size": size.text_hidden,
        "intermediate_size": size.text_intermediate,
        "num_hidden_layers": size.text_layers,
        "num_attention_heads": size.text_heads,
        "num_key_value_heads": size.text_kv_heads,
        "max_position_embeddings": 32768,
        "max_window_layers": size.text_layers,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": rope_theta,
            "mrope_section": mrope_section(size.text_hidden // size.text_heads),
        },
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
    }
    special = {
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "tie_word_embeddings": True,
    }
    if arch == "qwen2_5_vl":
        vision = {
            "depth": size.vision_depth,
            "hidden_size": size.vision_hidden,
            "intermediate_size": size.vision_intermediate,
            "num_heads": size.vision_heads,
            "out_hidden_size": size.text_hidden,
            "patch_size": patch_size,
            "spatial_merge_size": merge_size,
            "temporal_patch_size": 2,
            # Qwen2.5-VL attends within windows of 4x4 merged tokens (112 px at patch 14, merge 2) in
            # all blocks but the full-attention ones; keep that geometry and end on a full block.
            "window_size": 4 * patch_size * merge_size,
            "fullatt_block_indexes": [size.vision_depth - 1],
        }
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
    vision = {
        "depth": size.vision_depth,
        "embed_dim": size.vision_hidden,
        "hidden_size": size.text_hidden,
        "mlp_ratio": size.vision_intermediate // size.vision_hidden,  # Qwen2-VL: an int ratio
        "num_heads": size.vision_heads,
        "patch_size": patch_size,
        "spatial_merge_size": merge_size,
        "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(text_config=text, vision_config=vision, **special)


def build_tiny_model(
    out_dir: str | Path,
    size: str = "1m",
    seed: int = 0,
    *,
    merge_size: int = 2,
    patch_size: int = 14,
    arch: str = "qwen2_5_vl",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    rope_theta: float = 1_000_000.0,
) -> Path:
    """Build, randomly initialise and save a tiny Qwen-VL model folder; load it with ``from_pretrained``.

    Args:
        out_dir: folder to write (created; existing files of the same names are overwritten).
        size: a key of ``TINY_SIZES``: ``"1m"`` (CPU tests, quickstart), ``"10m"``, ``"50m"``.
        seed: seeds the weights (and nothing global: the caller's torch RNG state is restored).
        merge_size: vision tokens merged per side into one LLM token (``factor = patch * merge``).
        patch_size: vision patch side in pixels.
        arch: ``"qwen2_5_vl"`` or ``"qwen2_vl"``.
        min_pixels, max_pixels: the image processor's pixel budget; default ``64 * factor**2`` and
            ``256 * factor**2``.
        rope_theta: base of the language model's rotary frequencies (Qwen's 1e6 by default; see
            `TOY_BASE_MODEL` for why a tiny model that must locate image tokens wants 10).

    Returns:
        ``Path(out_dir)``.
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )
    from zoomgym.agents.models.processor import PROCESSORS
    from zoomgym.agents.models.tokenizer import QWEN_VL_CHAT_TEMPLATE, train_tiny_tokenizer

    if size not in TINY_SIZES:
        raise ValueError(f"Expects size in {sorted(TINY_SIZES)}, actual: {size!r}")
    if arch not in ARCHES:
        raise ValueError(f"Expects arch in {list(ARCHES)}, actual: {arch!r}")
    for name, value in (("merge_size", merge_size), ("patch_size", patch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Expects {name} to be a positive int, actual: {value!r}")
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or not 1 < rope_theta < float("inf"):
        raise ValueError(f"Expects rope_theta to be a finite number > 1, actual: {rope_theta!r}")
    factor = patch_size * merge_size
    min_pixels = 64 * factor**2 if min_pixels is None else min_pixels
    max_pixels = 256 * factor**2 if max_pixels is None else max_pixels
    if not 0 < min_pixels <= max_pixels or max_pixels < factor**2:
        raise ValueError(
            f"Expects 0 < min_pixels <= max_pixels and max_pixels >= factor**2 = {factor**2}, "
            f"actual: min_pixels={min_pixels}, max_pixels={max_pixels}"
        )

    tokenizer = train_tiny_tokenizer()
    token_ids = {name: tokenizer.convert_tokens_to_ids(name) for name in
                 ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                  "<|vision_end|>")}
    vocab_size = -(-len(tokenizer) // 64) * 64  # rounded up to a multiple of 64, like Qwen's 152064
    config = _config(arch, TINY_SIZES[size], vocab_size, token_ids, patch_size, merge_size, float(rope_theta))
    model_class = Qwen2_5_VLForConditionalGeneration if arch == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
        pad_token_id=token_ids["<|endoftext|>"],
        bos_token_id=token_ids["<|endoftext|>"],
    )
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size, merge_size=merge_size,
        temporal_patch_size=2,
    )
    processor = PROCESSORS[arch](image_processor, tokenizer, chat_template=QWEN_VL_CHAT_TEMPLATE)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def tiny_model_main(argv: list[str] | None = None) -> int:
    """``zoomgym tiny-model OUT [--preset toy-base] [--size 1m|10m|50m] [--seed N] [--merge-size N]
    [--patch-size N] [--arch A] [--min-pixels N] [--max-pixels N] [--rope-theta X]``."""
    parser = argparse.ArgumentParser(
        prog="zoomgym tiny-model",
        description="Build a randomly initialised tiny Qwen-VL model folder offline (for tests and the quickstart).",
    )
    parser.add_argument("out", type=Path, help="folder to write")
    parser.add_argument("--preset", choices=["toy-base"], default=None,
                        help="toy-base: the settings of TOY_BASE_MODEL (other flags override them)")
    parser.add_argument("--size", choices=sorted(TINY_SIZES), default=None, help="preset (default: 1m)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    parser.add_argument("--merge-size", type=int, default=None, help="vision tokens merged per side (default: 2)")
    parser.add_argument("--patch-size", type=int, default=None, help="vision patch side in pixels (default: 14)")
    parser.add_argument("--arch", choices=ARCHES, default="qwen2_5_vl", help="architecture (default: qwen2_5_vl)")
    parser.add_argument("--min-pixels", type=int, default=None, help="image budget floor (default: 64*factor^2)")
    parser.add_argument("--max-pixels", type=int, default=None, help="image budget cap (default: 256*factor^2)")
    parser.add_argument("--rope-theta", type=float, default=None, help="rotary base of the LM (default: 1e6)")
    args = parser.parse_args(argv)
    settings = dict(TOY_BASE_MODEL) if args.preset == "toy-base" else {}
    given = {"size": args.size, "merge_size": args.merge_size, "patch_size": args.patch_size,
             "min_pixels": args.min_pixels, "max_pixels": args.max_pixels, "rope_theta": args.rope_theta}
    settings.update({key: value for key, value in given.items() if value is not None})
    try:
        out = build_tiny_model(args.out, seed=args.seed, arch=args.arch, **settings)
    except ValueError as error:
        parser.error(str(error))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out, local_files_only=True)
    print(f"wrote a tiny {config.model_type} ({settings.get('size', '1m')}, seed {args.seed}) to {out}")
    return 0
