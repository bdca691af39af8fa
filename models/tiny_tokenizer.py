"""A real byte-level BPE tokenizer for the tiny presets, trained offline with `tokenizers` on a corpus made here.

No download: the corpus is generated from a fixed vocabulary of words about images, so the merges are
deterministic. Special tokens follow LLaVA-1.5's Llama tokenizer: <unk>=0, <s>=1, </s>=2, then <image>, <pad>.
"""

from __future__ import annotations

import itertools

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
VOCAB_SIZE = 1024

_WORDS = """a an the this that these those is are was were be been has have had do does did can could will would
what which who where when why how many much there here it its of in on at to from with without by for about into over
under above below near next behind between left right top bottom center middle front back side corner image picture
photo scene view shows show showing describe description detail details color colour red green blue yellow orange
purple pink brown black white gray grey dark light bright small large big tall short long wide round square person
people man woman child boy girl dog cat bird horse car bus truck bicycle train boat plane tree trees grass flower sky
cloud clouds sun water river sea beach mountain road street building house window door table chair cup bottle plate
food fruit apple banana book phone computer screen sign text number letters clock calendar wall floor room kitchen
office park city field snow rain night day morning evening sitting standing walking running holding wearing looking
playing eating drinking reading writing one two three four five six seven eight nine ten first second last other
some all any each every both few several most more less very quite please answer question briefly word sentence
yes no not and or but if then than so because while as like also only just still again""".split()


def _corpus():
    """Deterministic sentences: every word, pairs in a fixed order, and chat-style lines with punctuation."""
    words = _WORDS
    yield " ".join(words)
    for a, b in itertools.islice(itertools.product(words, repeat=2), 0, None, 7):
        yield f"{a} {b}"
    for i, w in enumerate(words):
        yield f"USER: What is the {w} in the image? ASSISTANT: The {words[(i * 7) % len(words)]} is {w}."
        yield f"Describe the {w}, please. There are {i % 10} {words[(i * 13) % len(words)]}s here!"
    yield "0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14 , . ! ? : ; ' \" ( ) - _ / \n"


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # Llama prepends <s>; the processor's chat prompt relies on it.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return tok
