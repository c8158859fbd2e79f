"""Quick start: a grounded caption, a grounding query and a two-image chat.

    python examples/quickstart.py                        # built-in demo model
    python examples/quickstart.py --preset /data/Qwen-VL-Chat

With `--preset` (a Hugging Face Qwen-VL / Qwen-VL-Chat folder, a Keras
preset folder written by tools/convert_qwen_vl_checkpoint.py, or a
registered name such as `qwen_vl_chat_7b` whose folder is set in
KERAS_QWENVL_QWEN_VL_CHAT_7B) it runs the real model. Without it, it builds a
small Qwen-VL with random weights and a byte-level vocabulary, so it needs no
download: the pipeline (image loading, `<img>` spans, the KV-cached
generation, ChatML, box parsing) runs end to end, but the words are noise.
Images come from scikit-image's sample data.
"""

import argparse
import os
import tempfile
import time

from PIL import Image


def demo_model(image_size=112):
    """A small random Qwen-VL with a byte-level vocabulary."""
    import keras

    from keras_qwenvl import QwenVLBackbone
    from keras_qwenvl import QwenVLCausalLM
    from keras_qwenvl import QwenVLCausalLMPreprocessor
    from keras_qwenvl import QwenVLImageConverter
    from keras_qwenvl import QwenVLTokenizer
    from keras_qwenvl import QwenVLVisionEncoder
    from keras_qwenvl.tokenizer import write_byte_level_vocabulary

    keras.utils.set_random_seed(0)
    vocabulary = write_byte_level_vocabulary(
        os.path.join(tempfile.mkdtemp(), "qwen.tiktoken")
    )
    tokenizer = QwenVLTokenizer(vocabulary)
    encoder = QwenVLVisionEncoder(
        image_size=image_size,
        patch_size=14,
        width=64,
        num_layers=2,
        num_heads=4,
        intermediate_dim=256,
        output_dim=128,
        num_queries=256,
    )
    backbone = QwenVLBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_heads=4,
        hidden_dim=128,
        intermediate_dim=256,
        seq_length=2048,
        image_start_token_id=tokenizer.image_start_token_id,
        vision_encoder=encoder,
    )
    preprocessor = QwenVLCausalLMPreprocessor(
        tokenizer,
        QwenVLImageConverter(image_size=(image_size, image_size)),
        sequence_length=1024,
    )
    return QwenVLCausalLM(backbone=backbone, preprocessor=preprocessor)


def sample_images(folder):
    """Writes two of scikit-image's sample pictures as files."""
    from PIL import Image
    from skimage import data

    paths = []
    for name in ("astronaut", "coffee"):
        path = os.path.join(folder, f"{name}.png")
        Image.fromarray(getattr(data, name)()).save(path)
        paths.append(path)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", help="Qwen-VL folder, preset or name")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    from keras_qwenvl import QwenVLCausalLM
    from keras_qwenvl import parse_grounding

    start = time.time()
    if args.preset:
        model = QwenVLCausalLM.from_preset(args.preset)
    else:
        print("No --preset: a small Qwen-VL with random weights (noise text).")
        model = demo_model()
    model.compile(sampler="greedy")
    print(f"model ready in {time.time() - start:.1f}s")

    folder = tempfile.mkdtemp()
    astronaut, coffee = sample_images(folder)
    width, height = Image.open(astronaut).size

    def complete(prompt, images):
        length = len(model.preprocessor.tokenizer.tokenize(prompt))
        return model.generate(
            {"prompts": prompt, "images": images},
            max_length=length + args.max_new_tokens,
            strip_prompt=True,
        )

    # 1. Grounded caption (base-model prompt of the paper's Box B.1).
    prompt = "<img></img>Generate the caption in English with grounding:"
    caption = complete(prompt, [astronaut])
    print("\n[grounded caption]", repr(caption))
    for item in parse_grounding(caption, (width, height)):
        print("   ", item)

    # 2. Referring grounding: ask for the box of a phrase.
    prompt = "<img></img><ref>the astronaut's face</ref><box>"
    answer = complete(prompt, [astronaut])
    print("\n[grounding]", repr(answer))
    print("   ", parse_grounding("<ref>face</ref><box>" + answer, (width, height)))

    # 3. Chat with two pictures, then a follow-up turn.
    response, history = model.chat(
        "What is different between the two pictures?",
        images=[astronaut, coffee],
        max_length=1024,
    )
    print("\n[chat]", repr(response))
    if args.preset:  # random weights emit stray tags that a turn 2 rejects
        response, history = model.chat(
            "Box the cup.", history=history, max_length=1024
        )
        print("[chat, turn 2]", repr(response))
    print(f"\ndone in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
