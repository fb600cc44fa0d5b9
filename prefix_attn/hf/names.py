"""The names prefix_attn registers with transformers, and the keywords that carry a batch's
prefixes from a model's forward (through its ``**kwargs``) to the attention function."""
ATTN_NAME = "prefix_attn"
SELECTION_KWARG = "prefix_selection"
PREFIXES_KWARG = "prefixes"
# Marks the sequence-id tensor that padding_mask returns for packed sequences.
PACKED_ATTR = "_prefix_attn_packed_sequence_ids"
