"""Token ids and loss masks of documents and conversations, with a checkpoint's own tokenizer and chat template.

Each piece (see :mod:`lightning_moe.tokenized.sources`) becomes ``(ids_N, trainable_N)``: token ids
and whether each token is a training target (predicted from the tokens before it).

- Text: every token is a target. The first piece of a document gets the special tokens the
  tokenizer puts before a text (Llama: BOS; Qwen2: none), the last gets the ones it puts after, then
  EOS unless that already ends it: the separator the model family saw between pretraining documents.
- A conversation is rendered by the tokenizer's chat template and tokenised without adding special
  tokens (the template writes them). Only the assistant turns are targets: the text each assistant
  message adds after the generation prompt of the conversation before it, up to and including its
  end-of-turn token(s); system, user and tool turns and the template's role headers are not. With a
  template that marks assistant text with ``{% generation %}``, transformers' assistant mask is used
  instead (it also handles templates whose earlier turns change as the conversation grows). Nothing
  is appended after a conversation: its template's own tokens separate it from the next.

Shape legend: ``N`` tokens of a piece, ``S`` assistant spans.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from lightning_moe.tokenized.sources import BadInputError, Piece

#: ``{% generation %}`` (with optional whitespace control) in a chat template.
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def load_tokenizer(directory: str, owner: str) -> Any:
    """``transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)`` with a clear error.

    Args:
        directory: a checkpoint or tokenizer directory.
        owner: the class named in errors.
    """
    if not Path(directory).is_dir():
        raise ValueError(
            f"{owner}: `tokenizer` {directory!r} is not a directory. Give a local checkpoint directory that holds "
            f"tokenizer.json / tokenizer_config.json (nothing is downloaded)."
        )
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((Path(directory) / name).is_file() for name in names):
        # transformers would say it needs sentencepiece or tiktoken: the files are what is missing.
        raise ValueError(
            f"{owner}: `tokenizer` {directory!r} holds no tokenizer files ({', '.join(names)}). Point it at the "
            f"checkpoint directory that has them (a weights-only copy lacks them)."
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{owner}: the tokenizer in {directory!r} is a slow (Python) tokenizer; the loss mask needs character "
            f"offsets, which only fast tokenizers give. Add a tokenizer.json (save the tokenizer with transformers)."
        )
    return tokenizer


def checkpoint_vocab_size(directory: str) -> int | None:
    """The embedding rows of the model saved in ``directory`` (``config.json``'s ``vocab_size``), if any.

    Args:
        directory: a checkpoint directory.
    """
    config_path = Path(directory) / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def _special_tokens_around_text(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text (e.g. ``[bos]``, ``[]``), found by encoding a probe."""
    probe = "a"
    plain = tokenizer.encode(probe, add_special_tokens=False)
    special = tokenizer.encode(probe, add_special_tokens=True)
    for start in range(len(special) - len(plain) + 1):
        if special[start : start + len(plain)] == plain:
            return special[:start], special[start + len(plain) :]
    return [], []


def _turn_end(through: str, content: object) -> int:
    """Where an assistant turn's targets end in ``through`` (the conversation rendered up to it): after
    its end-of-turn marker, without the whitespace a template writes after one (ChatML's newline after
    ``<|im_end|>``, never generated, and left out by ``{% generation %}`` blocks too). A template that
    ends the turn with whitespace alone (``{content}\n\n``) keeps it: it is how the turn ends."""
    if not (isinstance(content, str) and content and content in through):
        return len(through)
    content_end = through.rfind(content) + len(content)
    marker_end = len(through.rstrip())
    return marker_end if marker_end > content_end else len(through)


class DocumentEncoder:
    """Encodes pieces into ``(ids, trainable)`` arrays with a transformers tokenizer.

    Args:
        tokenizer: a fast transformers tokenizer.
        vocab_size: token ids must be below it (the model's embedding rows).
        append_eos: end each text document with the tokenizer's EOS.
    """

    def __init__(self, tokenizer: Any, *, vocab_size: int, append_eos: bool = True) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.prefix_ids, suffix = _special_tokens_around_text(tokenizer)
        eos = tokenizer.eos_token_id
        if append_eos and eos is not None and (not suffix or suffix[-1] != eos):
            suffix = [*suffix, eos]
        self.suffix_ids = suffix
        template = getattr(tokenizer, "chat_template", None)
        self.has_generation_blocks = isinstance(template, str) and bool(_GENERATION_BLOCK.search(template))

    def encode(self, piece: Piece) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int32) and the per-token target mask (bool) of ``piece``.

        Raises:
            BadInputError: the piece cannot be encoded (naming its file and line).
        """
        result = self.encode_batch([piece])[0]
        if isinstance(result, BadInputError):
            raise result
        return result

    def encode_batch(self, pieces: list[Piece]) -> list[tuple[np.ndarray, np.ndarray] | BadInputError]:
        """:meth:`encode` of each piece (texts in one tokenizer call), or the error of a piece that fails."""
        texts = [piece.text for piece in pieces if piece.messages is None]
        text_ids = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else ())
        results: list[tuple[np.ndarray, np.ndarray] | BadInputError] = []
        for piece in pieces:
            try:
                if piece.messages is not None:
                    ids, trainable = self._encode_chat(piece)
                else:
                    prefix = self.prefix_ids if piece.starts_document else []
                    suffix = self.suffix_ids if piece.ends_document else []
                    ids = np.asarray(prefix + list(next(text_ids)) + suffix, dtype=np.int64)
                    trainable = np.ones(len(ids), dtype=bool)
                if len(ids) and int(ids.max()) >= self.vocab_size:
                    raise BadInputError(
                        piece.location,
                        "token id",
                        f"token id {int(ids.max())} is not below `vocab_size` {self.vocab_size} (the model's embedding "
                        f"rows). Use the tokenizer of the checkpoint you fine-tune.",
                    )
                results.append((ids.astype(np.int32), trainable))
            except BadInputError as error:
                results.append(error)
        return results

    def _render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False) -> str:
        if messages:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        # The generation prompt of an empty conversation (before an opening assistant message):
        # `apply_chat_template` refuses empty conversations, so call the renderer it wraps.
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            conversations=[[]],
            chat_template=self.tokenizer.get_chat_template(),
            add_generation_prompt=add_generation_prompt,
            **self.tokenizer.special_tokens_map,
        )
        return rendered[0]

    def _encode_chat(self, piece: Piece) -> tuple[np.ndarray, np.ndarray]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadInputError(
                piece.location,
                "no chat template",
                "a chat line, but the tokenizer has no chat_template. Use an instruct checkpoint's tokenizer, add a "
                "chat_template to its tokenizer_config.json, or give the data as text.",
            )
        from jinja2 import TemplateError

        try:
            return self._encode_messages(piece)
        except TemplateError as error:
            # Templates refuse conversations they do not expect (`raise_exception` on roles that do
            # not alternate, a system turn; `messages[0]` read before an opening assistant turn).
            raise BadInputError(
                piece.location,
                "template",
                f"the chat template rejects this conversation ({type(error).__name__}: {error}). Fix the line, "
                f"or skip such lines with on_bad_line='skip'.",
            ) from None

    def _encode_messages(self, piece: Piece) -> tuple[np.ndarray, np.ndarray]:
        messages = piece.messages
        if self.has_generation_blocks:
            encoded = self.tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            return np.asarray(encoded["input_ids"], dtype=np.int64), np.asarray(encoded["assistant_masks"], dtype=bool)
        full = self._render(messages)
        span_starts, span_ends = [], []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            # The assistant turn is what message `index` adds to the conversation before it once the
            # generation prompt is written: its text and end-of-turn token(s), not its role header.
            prompt = self._render(messages[:index], add_generation_prompt=True)
            through = self._render(messages[: index + 1])
            if not (through.startswith(prompt) and full.startswith(through)):
                raise BadInputError(
                    piece.location,
                    "template",
                    f"the chat template renders message {index} differently once later messages follow, so its "
                    f"assistant tokens cannot be located. Use a template with {{% generation %}} blocks.",
                )
            span_starts.append(len(prompt))
            span_ends.append(_turn_end(through, message["content"]))
        encoded = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        token_starts_N = np.asarray([start for start, _ in encoded["offset_mapping"]], dtype=np.int64)
        starts_S, ends_S = np.asarray(span_starts, dtype=np.int64), np.asarray(span_ends, dtype=np.int64)
        # A token is a target when it starts inside an assistant span (spans are disjoint and sorted).
        span_N = np.searchsorted(starts_S, token_starts_N, side="right") - 1
        trainable = (span_N >= 0) & (token_starts_N < ends_S[np.maximum(span_N, 0)])
        return ids, trainable
