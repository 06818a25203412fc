"""The data side: rows -> examples -> privileged views -> chat-templated student and teacher prompts; bundled tiny sets.

| module      | what it holds                                                                                  |
|-------------|------------------------------------------------------------------------------------------------|
| `examples`  | `DataConfig`, `load_examples`: math / code rows validated into `MathExample` / `CodeExample`    |
| `views`     | the payload each view sees (math: full / partial solution, answer; code: reference, hint, feedback) |
| `prompts`   | `PromptConfig`, student / teacher / eval messages, `encode_prompts` with the chat template      |
| `tiny`      | the bundled tiny math set, BPE tokenizer and 4-layer Qwen3 config (`assets/`), `make_tiny_hf_checkpoint` |
| `tiny_code` | the bundled tiny stdin/stdout code set (`assets/tiny_code/`)                                    |
"""

from avsd_megatron.data.examples import (
    BadRowError,
    CodeExample,
    DataConfig,
    LoadReport,
    MathExample,
    RowRef,
    code_example_from_row,
    load_examples,
    math_example_from_row,
)
from avsd_megatron.data.prompts import (
    EncodedPrompts,
    PromptConfig,
    PromptReport,
    code_feedback_prompt,
    code_prompts,
    encode_prompts,
    math_eval_message,
    math_prompts,
    math_student_message,
    math_teacher_message,
    render_chat,
)
from avsd_megatron.data.tiny import TINY_HELDOUT_PATH, TINY_TRAIN_PATH, load_tiny_tokenizer, make_tiny_hf_checkpoint
from avsd_megatron.data.tiny_code import TINY_CODE_HELDOUT_PATH, TINY_CODE_TRAIN_PATH
from avsd_megatron.data.views import (
    CODE_VIEWS,
    MATH_VIEWS,
    CodeFeedback,
    ViewStats,
    code_view_payload,
    feedback_payload,
    math_view_payload,
    normalize_views,
)

__all__ = [
    "CODE_VIEWS",
    "MATH_VIEWS",
    "TINY_CODE_HELDOUT_PATH",
    "TINY_CODE_TRAIN_PATH",
    "TINY_HELDOUT_PATH",
    "TINY_TRAIN_PATH",
    "BadRowError",
    "CodeExample",
    "CodeFeedback",
    "DataConfig",
    "EncodedPrompts",
    "LoadReport",
    "MathExample",
    "PromptConfig",
    "PromptReport",
    "RowRef",
    "ViewStats",
    "code_example_from_row",
    "code_feedback_prompt",
    "code_prompts",
    "code_view_payload",
    "encode_prompts",
    "feedback_payload",
    "load_examples",
    "load_tiny_tokenizer",
    "make_tiny_hf_checkpoint",
    "math_eval_message",
    "math_example_from_row",
    "math_prompts",
    "math_student_message",
    "math_teacher_message",
    "math_view_payload",
    "normalize_views",
    "render_chat",
]
