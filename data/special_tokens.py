"""loom's special tokens, defined once: ids of the reserved tokens and chat markers.

The byte tokenizer and the sentencepiece models loom trains put pad, bos, eos
(and, for sentencepiece, unk) at ids 0..3. A model loaded from elsewhere may
lay them out differently; read the ids from the tokenizer, not from here.
"""

PAD = "<pad>"
BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# ChatML turn markers: <|im_start|>{role}\n{content}<|im_end|>\n per message.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHAT_ROLES = ("system", "user", "assistant")

# Pieces that sentencepiece training always keeps as single tokens: '\n' because
# training sees lines with their newlines split off, the markers so that a chat
# turn boundary is one token.
USER_DEFINED_SYMBOLS = ("\n", IM_START, IM_END)
