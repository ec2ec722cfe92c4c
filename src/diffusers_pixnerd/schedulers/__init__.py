from .scheduling_pixnerd import (
    OFFICIAL_SCHEDULER_PRESETS,
    PixNerdFlowMatchScheduler,
    PixNerdFlowMatchSchedulerOutput,
)

__all__ = ["OFFICIAL_SCHEDULER_PRESETS", "PixNerdFlowMatchScheduler", "PixNerdFlowMatchSchedulerOutput"]
