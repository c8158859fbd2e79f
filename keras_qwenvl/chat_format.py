"""Qwen-VL-Chat's prompt format: ChatML turns and numbered pictures.

A chat prompt of Qwen-VL-Chat reads

    <|im_start|>system
    You are a helpful assistant.<|im_end|>
    <|im_start|>user
    Picture 1: <img>coffee.png</img>
    What is on the table?<|im_end|>
    <|im_start|>assistant

with one `Picture N: <img>...</img>\\n` line per image before the user's
text. Pictures are numbered across the whole conversation: the first image
of a later turn continues from the last number of the earlier turns. The text
inside `<img>` is the image's path (the original's convention), or empty
when the image is given as pixels.

For fine-tuning, a conversation is split into segments exactly as the
original `finetune.py` tokenizes it (each segment on its own), with the
original's labels: the loss is on each assistant reply and on the ChatML
special tokens of every turn (`<|im_start|>`, and `<|im_end|>` with its
newline), never on role names, the system prompt or the user's words.
"""

import collections
import re

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_START = "<img>"
IMAGE_END = "</img>"

_IMAGE_TAG_PATTERN = re.compile(r"<img>(.*?)</img>", re.DOTALL)

ChatPrompt = collections.namedtuple("ChatPrompt", ["prompt", "images", "query"])
ChatPrompt.__doc__ = """The result of `build_chat_prompt`.

Fields:
    prompt: the full ChatML text, ending with `<|im_start|>assistant\\n`.
    images: one entry per `<img>` tag of `prompt`, in order: the image
        passed for it, or the tag's text (a path) where none was passed.
    query: this turn's user text with its `Picture N:` lines, to keep in
        the history as `(query, response, images)`.
"""


def find_image_tags(text):
    """Returns the contents of the `<img>...</img>` tags of a text, in order.

    Raises:
        ValueError: if an `<img>` is not closed, or a `</img>` has no
            opening tag.
    """
    contents = []
    position = 0
    for match in _IMAGE_TAG_PATTERN.finditer(text):
        _check_no_stray_tag(text[position : match.start()], position)
        contents.append(match.group(1))
        position = match.end()
    _check_no_stray_tag(text[position:], position)
    return contents


def _check_no_stray_tag(text, offset):
    """Raises if `text` (outside complete tags) holds `<img>` or `</img>`."""
    for tag, problem in (
        (IMAGE_START, "is not closed by `</img>`"),
        (IMAGE_END, "has no opening `<img>`"),
    ):
        index = text.find(tag)
        if index >= 0:
            raise ValueError(
                f"unclosed image tag: `{tag}` at character {offset + index} "
                f"{problem}: {text[index:][:60]!r}"
            )


def format_pictures(images, first_number=1):
    """Writes one `Picture N: <img>...</img>\\n` line per image.

    Args:
        images: a list of images. A string is a path and goes inside the
            tag; any other image (an array, a PIL image) leaves the tag
            empty, to be filled with that image by the preprocessor.
        first_number: the number of the first picture.

    Example:
    >>> format_pictures(["a.jpg", "b.jpg"], first_number=2)
    'Picture 2: <img>a.jpg</img>\\nPicture 3: <img>b.jpg</img>\\n'
    """
    lines = []
    for number, image in enumerate(images, start=first_number):
        name = image if isinstance(image, str) else ""
        lines.append(f"Picture {number}: {IMAGE_START}{name}{IMAGE_END}\n")
    return "".join(lines)


def _chatml_turn(role, content):
    """`<|im_start|>role\\ncontent<|im_end|>`, without the trailing newline."""
    return f"{IM_START}{role}\n{content}{IM_END}"


def images_for_tags(tags, images, where):
    """One image per `<img>` tag: `images` in order, or, when None, the
    tags' own text (paths).

    Raises:
        ValueError: naming `where` (e.g. "sample 3") when a tag is empty
            and no images were passed, or when the counts differ.
    """
    if images is None:
        empty = [i for i, tag in enumerate(tags) if not tag]
        if empty:
            raise ValueError(
                f"{where}: `<img>` tag {empty[0]} is empty and no image was "
                "passed for it; pass the images or write a path inside the "
                "tag."
            )
        return list(tags)
    images = list(images)
    if len(images) > len(tags):
        raise ValueError(
            f"{where}: {len(images)} images were passed but the text has "
            f"only {len(tags)} `<img>` tags; each image needs a tag."
        )
    if len(images) < len(tags):
        raise ValueError(
            f"{where}: `<img>` tag {len(images)} has no image "
            f"({len(images)} images passed for {len(tags)} tags)."
        )
    return images


def _turn_images(query, images, where):
    """One image per `<img>` tag of `query`: `images`, or the tag paths."""
    return images_for_tags(find_image_tags(query), images, where)


def build_chat_prompt(
    query, history=None, images=None, system_prompt=DEFAULT_SYSTEM_PROMPT
):
    """Builds Qwen-VL-Chat's ChatML prompt for the next reply.

    The prompt is the system turn, the earlier turns, then the new user turn
    (its pictures first, numbered after those of the history, then `query`)
    and the opening of the assistant's turn, as the original `chat` does.

    Args:
        query: the user's text for this turn. It may hold `<img>path</img>`
            tags of its own; they are not numbered.
        history: earlier turns, a list of `(query, response)` or
            `(query, response, images)`: the `ChatPrompt.query` of that turn
            (its pictures included), the reply, and the images filling the
            query's `<img>` tags (left out: the tags hold paths).
        images: this turn's images (paths, arrays or PIL images), written
            as `Picture N:` lines before `query`.
        system_prompt: the system turn's text.

    Returns:
        A `ChatPrompt(prompt, images, query)`.

    Example:
    >>> chat = build_chat_prompt("What is it?", images=["cat.jpg"])
    >>> print(chat.prompt)
    <|im_start|>system
    You are a helpful assistant.<|im_end|>
    <|im_start|>user
    Picture 1: <img>cat.jpg</img>
    What is it?<|im_end|>
    <|im_start|>assistant
    <BLANKLINE>
    """
    turns = [_chatml_turn("system", system_prompt)]
    all_images = []
    for index, entry in enumerate(history or []):
        if len(entry) not in (2, 3):
            raise ValueError(
                f"history entry {index} must be `(query, response)` or "
                f"`(query, response, images)`. Received: {entry!r}"
            )
        past_query, response = entry[0], entry[1]
        past_images = entry[2] if len(entry) == 3 else None
        all_images += _turn_images(
            past_query, past_images, f"history entry {index}"
        )
        turns.append(_chatml_turn("user", past_query))
        turns.append(_chatml_turn("assistant", response))
    images = list(images or [])
    own_images = _turn_images(query, None, "query")
    query = format_pictures(images, first_number=len(all_images) + 1) + query
    all_images += images + own_images
    turns.append(_chatml_turn("user", query))
    prompt = "\n".join(turns) + f"\n{IM_START}assistant\n"
    return ChatPrompt(prompt, all_images, query)


def _turn_field(turn, keys, index):
    for key in keys:
        if key in turn:
            return turn[key]
    raise ValueError(
        f"turn {index} of the conversation has none of the keys "
        f"{' / '.join(repr(k) for k in keys)}. Received: {turn!r}"
    )


def _turn_segments(role, content, is_reply):
    """One ChatML turn as `(text, carries_loss)` segments: the special
    tokens always carry loss, the content only when it is a reply."""
    return [
        (IM_START, True),
        (f"{role}\n", False),
        (content, is_reply),
        (IM_END, True),
        ("\n", True),
    ]


def conversation_segments(conversation, system_prompt=DEFAULT_SYSTEM_PROMPT):
    """Splits a fine-tuning conversation into ChatML segments marked for loss.

    The segments are tokenized one by one and concatenated, as the original
    `finetune.py` does (so that a reply starting with a space or a newline
    tokenizes the same). Their texts joined are the ChatML text:
    `<|im_start|>system\\n{system}<|im_end|>\\n`, then per turn
    `<|im_start|>{role}\\n{content}<|im_end|>\\n`. The loss is on each
    assistant content and on every turn's `<|im_start|>`, `<|im_end|>` and
    the newline after it (the original's labels); role names, the system
    prompt and the user's contents carry none.

    Args:
        conversation: a list of turns `{"from": "user" | "assistant",
            "value": str}` (the original's JSON) or `{"role": ...,
            "content": ...}`, starting with the user, alternating, ending
            with the assistant.
        system_prompt: the system turn's text.

    Returns:
        A list of `(text, carries_loss)` pairs.

    Raises:
        ValueError: naming the turn, if the turns do not alternate, a role
            is unknown or a content is not a string.
    """
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError(
            "A conversation is a non-empty list of turns. "
            f"Received: {conversation!r}"
        )
    segments = _turn_segments("system", system_prompt, False)
    for index, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise ValueError(
                f"turn {index} of the conversation must be a dict. "
                f"Received: {turn!r}"
            )
        role = _turn_field(turn, ("from", "role"), index)
        content = _turn_field(turn, ("value", "content"), index)
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(
                f"turn {index} of the conversation has role {role!r} where "
                f"{expected!r} was expected: turns alternate user, "
                "assistant, user, ..."
            )
        if not isinstance(content, str):
            raise ValueError(
                f"turn {index} of the conversation: the content must be a "
                f"string. Received: {content!r}"
            )
        segments += _turn_segments(role, content, role == "assistant")
    if len(conversation) % 2:
        raise ValueError(
            f"turn {len(conversation) - 1} of the conversation is a user "
            "turn with no assistant reply after it; a fine-tuning "
            "conversation ends with the assistant."
        )
    return segments
