"""What a plugin author imports: the declarations, base classes and helpers of docs/plugins.md.

    from mfed.plugins import InputSpec, MapFeatures, Task, VectorFeatures, VectorOutput

An encoder factory `(params) -> nn.Module` returns a module with `input_spec` and
`feature_spec`; a decoder factory `(params, features, output) -> nn.Module`; a task type is a
`Task` subclass `(params, input_spec)`. They are registered under the entry point groups
`mfed.encoders`, `mfed.decoders` and `mfed.tasks` (mfed.registry).
"""

from mfed.learning.params import ArchError, int_list, positive_int, with_defaults
from mfed.learning.shapes import DenseOutput, Features, InputSpec, MapFeatures, Output, VectorFeatures, VectorOutput
from mfed.learning.tasks import Classification, Task, TaskError

__all__ = [
    "ArchError",
    "Classification",
    "DenseOutput",
    "Features",
    "InputSpec",
    "MapFeatures",
    "Output",
    "Task",
    "TaskError",
    "VectorFeatures",
    "VectorOutput",
    "int_list",
    "positive_int",
    "with_defaults",
]
