"""The chat template that travels with an adapter: ``chat_template.jinja`` in the adapter directory.

Training renders conversations with one template — ``data.template`` (a named one or a Jinja string) or
the tokenizer's own. An adapter only answers well when prompts are rendered the same way, so the template
is saved beside the adapter files (the file name transformers uses, so ``AutoTokenizer`` picks it up from a
merged directory too) and every later step — ``peftlab eval DIR``, ``generate``, ``merge``, GGUF export,
continued training from ``adapter.init_from`` — puts it on the tokenizer instead of the base's (often none).

The saved source is self-contained: when the tokenizer's convention starts every sequence with BOS
(Llama, Mistral) and the template does not print ``bos_token`` (peftlab's named templates leave BOS to the
tokenizer), ``{{ bos_token }}`` is written at its front. Rendering it and tokenizing without special tokens —
what ``tokenizer.apply_chat_template(..., tokenize=True)`` and llama.cpp do — then gives exactly the ids
training saw; peftlab's own encoder keeps one BOS either way.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peftlab.checkpoint.atomic import atomic_write_text
from peftlab.errors import PeftlabError

TEMPLATE_FILE = "chat_template.jinja"


def training_template(tokenizer: Any, template: str | None) -> str | None:
    """The Jinja source a run with ``data.template = template`` renders conversations with (None: the run
    has no chat template: the tokenizer has none and the recipe names none)."""
    from peftlab.data.templates import ChatRenderer
    from peftlab.data.tokenize import Encoder

    try:
        source = ChatRenderer(tokenizer, template).source
    except PeftlabError:  # no template anywhere: text / completion data only
        return None
    if "bos_token" not in source and tokenizer.bos_token and Encoder(tokenizer).adds_bos:
        source = "{{ bos_token }}" + source
    return source


def save_chat_template(adapter_dir: str | os.PathLike[str], source: str | None) -> Path | None:
    """Write ``source`` as ``chat_template.jinja`` in ``adapter_dir`` (atomically, UTF-8); None: nothing."""
    if source is None:
        return None
    return atomic_write_text(Path(adapter_dir) / TEMPLATE_FILE, source)


def read_chat_template(adapter_dir: str | os.PathLike[str]) -> str | None:
    """The template saved with an adapter, or None."""
    path = Path(adapter_dir) / TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise PeftlabError(f"{path} is not UTF-8 text; a chat template is a Jinja text file. Delete it to use "
                           "the tokenizer's own template, or re-save it as UTF-8") from None


def use_adapter_template(tokenizer: Any, adapter_dir: str | os.PathLike[str] | None) -> bool:
    """Put the adapter's saved template on ``tokenizer`` (this instance only); True when there was one."""
    source = read_chat_template(adapter_dir) if adapter_dir is not None else None
    if source is None:
        return False
    tokenizer.chat_template = source
    return True
