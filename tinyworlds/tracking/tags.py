"""The tags every tinyworlds run carries (see the package docstring)."""

STAGE_TAG = "tinyworlds.stage"
DATASETS_TAG = "tinyworlds.datasets"
COMMIT_TAG = "tinyworlds.git_commit"
PIPELINE_TAG = "tinyworlds.pipeline_run"
PIPELINE_NAME_TAG = "tinyworlds.pipeline"
DVC_EXPERIMENT_TAG = "tinyworlds.dvc_experiment"
DVC_STAGE_TAG = "tinyworlds.dvc_stage"
PARENT_TAG = "tinyworlds.parent"
FINAL_METRICS_TAG = "tinyworlds.final_metrics"
ERROR_TAG = "tinyworlds.error"
MODEL_TAG_PREFIX = "tinyworlds.model."  # + kind: the sha256 of the model.safetensors a run attached
