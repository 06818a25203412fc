"""AVSD inside Megatron-Core's schedules: the teacher scoring pass, the loss as a forward_step_func, the step.

| module              | what it holds                                                                             |
|---------------------|-------------------------------------------------------------------------------------------|
| `batch`             | `build_avsd_batch`: student and M teacher rows (none for GRPO), contiguous positions,     |
|                     | completion indices, the pad-id loss mask                                                  |
| `packing`           | `pack_batch`: a batch's rows back to back (THD, cu_seqlens, `PackedSeqParams`)            |
| `completion_output` | `GPTModel(output_processor=...)`: the output layer only at completion positions           |
| `scoring`           | `score_teachers`: one forward-only schedule over all M·B teacher rows                     |
| `teacher_kinds`     | frozen θ₀ / live / EMA teachers (weights swapped in place, restored bit for bit)          |
| `master_restore`    | `MasterRestore`: θ back from the distributed optimizer's fp32 master (no swap buffer)     |
| `loss`              | `AVSDLossConfig`, `AVSDForwardStep` (the loss for `get_forward_backward_func`); also the  |
|                     | GRPO policy-gradient loss (`loss='policy_gradient'`, advantages with the micro-batch)     |
| `step`              | `AVSDStep`: score_teachers -> update_student -> optimizer step -> teacher update          |

Nothing here changes Megatron-Core; process groups are passed in (`MegatronGroups`). Megatron is imported inside
the functions that use it.
"""

from avsd_megatron.hook.batch import AVSDBatch, AVSDMicroBatch, StreamInputs, build_avsd_batch
from avsd_megatron.hook.completion_output import (
    CompletionLogits,
    completion_hidden_states,
    completion_logits,
    output_weight_of,
    project_to_logits,
)
from avsd_megatron.hook.loss import (
    LOSS_KINDS,
    NORMALIZATIONS,
    AVSDForwardStep,
    AVSDLossConfig,
    TeacherOutputs,
    avsd_microbatch_loss,
)
from avsd_megatron.hook.master_restore import MasterRestore
from avsd_megatron.hook.packing import PackedLayout, pack_batch, packed_seq_params, packing_multiples
from avsd_megatron.hook.scoring import TeacherScoringStep, score_teachers
from avsd_megatron.hook.step import AVSDStep, MegatronGroups, StepResult, reduce_metrics
from avsd_megatron.hook.teacher_kinds import (
    TEACHER_KINDS,
    EMATeacher,
    FrozenTeacher,
    LiveTeacher,
    Teacher,
    TeacherConfig,
    build_teacher,
)

__all__ = [
    "LOSS_KINDS",
    "NORMALIZATIONS",
    "TEACHER_KINDS",
    "AVSDBatch",
    "AVSDForwardStep",
    "AVSDLossConfig",
    "AVSDMicroBatch",
    "AVSDStep",
    "CompletionLogits",
    "EMATeacher",
    "FrozenTeacher",
    "LiveTeacher",
    "MasterRestore",
    "MegatronGroups",
    "PackedLayout",
    "StepResult",
    "StreamInputs",
    "Teacher",
    "TeacherConfig",
    "TeacherOutputs",
    "TeacherScoringStep",
    "avsd_microbatch_loss",
    "build_avsd_batch",
    "build_teacher",
    "completion_hidden_states",
    "completion_logits",
    "output_weight_of",
    "pack_batch",
    "packed_seq_params",
    "packing_multiples",
    "project_to_logits",
    "reduce_metrics",
    "score_teachers",
]
