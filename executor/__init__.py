"""The executor: runs a physical plan as an async ready-queue over its DAG.

```python
result = await execute(plan, {"ticket": text}, backends=Backends([EngineBackend(engine)]),
                       tools=registry, limits=RunLimits(per_resource={"model:*": 8}),
                       emit=events.append)
```
"""

from executor.backends import (
    Backends,
    EngineBackend,
    ModelBackend,
    ModelCall,
    ModelResult,
    OpenAIBackend,
)
from executor.cache import ResultCache
from executor.context import RunContext, StepResult
from executor.errors import (
    BackendError,
    BudgetExceeded,
    ExecutorError,
    FanOutExceeded,
    InputError,
    OperatorError,
    OutputError,
    RunTimeout,
    StepFailed,
    StepTimeout,
)
from executor.events import Event, decode_event, encode_event
from executor.operators import PipelineResolver, ToolCaller
from executor.run import RunLimits, RunResult, execute

__all__ = [
    "BackendError",
    "Backends",
    "BudgetExceeded",
    "EngineBackend",
    "Event",
    "ExecutorError",
    "FanOutExceeded",
    "InputError",
    "ModelBackend",
    "ModelCall",
    "ModelResult",
    "OpenAIBackend",
    "OperatorError",
    "OutputError",
    "PipelineResolver",
    "ResultCache",
    "RunContext",
    "RunLimits",
    "RunResult",
    "RunTimeout",
    "StepFailed",
    "StepResult",
    "StepTimeout",
    "ToolCaller",
    "decode_event",
    "encode_event",
    "execute",
]
