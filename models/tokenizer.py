"""Train a small byte-level BPE tokenizer offline and wrap it for transformers and vLLM.

Nothing can be downloaded from a model hub here, so every model this project builds (the demo
student, the tiny test models) gets its tokenizer from text it already has.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS = "<s>"
EOS = "<|im_end|>"
PAD = "<pad>"
UNK = "<unk>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = [PAD, BOS, UNK, IM_START, EOS]

# ChatML: one turn per message; generation stops at <|im_end|> (the EOS token).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`: any input (Vietnamese diacritics, emoji) stays encodable."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IM_START],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped
