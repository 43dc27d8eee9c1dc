"""loom data: sources -> tokenizer -> packed rows (in memory or prepared on disk) -> batches.

Independent of model/, training/ and sharding/.
"""
from data.datasets import build_datasets
from data.datasets import Datasets
from data.packing import PackedRows
from data.tokenizers import build_tokenizer
from data.tokenizers import ByteTokenizer
from data.tokenizers import CharTokenizer
from data.tokenizers import SentencePieceTokenizer
from data.tokenizers import Tokenizer

__all__ = [
    'build_datasets', 'Datasets', 'PackedRows', 'build_tokenizer',
    'ByteTokenizer', 'CharTokenizer', 'SentencePieceTokenizer', 'Tokenizer',
]
