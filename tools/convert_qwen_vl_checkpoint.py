#!/usr/bin/env python3
"""Convert a Hugging Face Qwen-VL checkpoint folder to a Keras preset.

Usage:

    python tools/convert_qwen_vl_checkpoint.py --hf-dir /data/Qwen-VL-Chat
        --preset-dir ./qwen_vl_chat_7b [--dtype bfloat16|float32]

The folder is a download of Qwen/Qwen-VL or Qwen/Qwen-VL-Chat (config.json,
safetensors, qwen.tiktoken). Every tensor name and shape is checked first.
The model is built from config.json, then the checkpoint is ported one tensor
at a time from the safetensors files (plain reads, no memory map), so the
peak memory is about the size of the converted model plus what building it
with random initial values takes transiently. The output is a Keras preset
of `QwenVLCausalLM` with its preprocessor (tokenizer, image converter); it
loads with `keras_hub.models.CausalLM.from_preset(DIR)` after
`import keras_qwenvl`. Needs keras_qwenvl installed (`pip install -e .`).
"""

import argparse
import os
import resource
import sys

from keras_hub.src.utils.preset_utils import CONFIG_FILE
from keras_hub.src.utils.preset_utils import load_json
from keras_hub.src.utils.tensor_utils import get_tensor_size_in_bits

from keras_qwenvl.causal_lm import QwenVLCausalLM
from keras_qwenvl.convert import QwenVLPresetLoader


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--hf-dir", required=True, help="Hugging Face Qwen-VL folder."
    )
    parser.add_argument(
        "--preset-dir", required=True, help="Output Keras preset folder."
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="Dtype of the converted weights (default: bfloat16).",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.hf_dir):
        sys.exit(f"error: --hf-dir {args.hf_dir} is not a folder.")
    if os.path.isdir(args.preset_dir) and os.listdir(args.preset_dir):
        sys.exit(f"error: --preset-dir {args.preset_dir} is not empty.")

    try:
        loader = QwenVLPresetLoader(
            args.hf_dir, load_json(args.hf_dir, CONFIG_FILE)
        )
        loader.check_checkpoint()
        causal_lm = loader.load_task(
            QwenVLCausalLM,
            load_weights=False,
            load_task_weights=False,
            dtype=args.dtype,
        )
        loader.load_weights(causal_lm.backbone, progress=True)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    causal_lm.save_to_preset(args.preset_dir)

    weight_bytes = sum(
        get_tensor_size_in_bits(v.shape, v.dtype) // 8
        for v in causal_lm.backbone.weights
    )
    # ru_maxrss is in KiB on Linux.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"Wrote {args.preset_dir}: {causal_lm.backbone.count_params():,} "
        f"parameters, {weight_bytes / 2**30:.2f} GiB of weights "
        f"({args.dtype}); peak RSS {peak / 2**30:.2f} GiB."
    )


if __name__ == "__main__":
    main()
