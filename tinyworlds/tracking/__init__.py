"""MLflow tracking for pipeline stages: one MLflow run per DVC stage execution.

Where runs go: `MLFLOW_TRACKING_URI` if set, else `tracking.uri` from params.yaml, else an
embedded SQLite store `<project root>/mlflow.db` with artifacts in `<project root>/mlartifacts`.
The project root is the DVC repository root. `dvc exp run --temp` and queued experiments run
in throwaway copies under `<root>/.dvc/tmp/exps/`; a store there would be deleted with the copy,
so the root always resolves to the original project (DVC also exports it as `DVC_ROOT`).

What a stage run records (see `StageRun`): the flattened config as params (and in full as
the artifact resolved_config.json), step metrics, final (summary) metrics, headline ones at
the top level and the detail under a section prefix (`naming`), artifacts, the model it
trained (`models/<kind>/`, `models`), and these tags:
    tinyworlds.stage           the stage name
    tinyworlds.datasets        comma-separated dataset names
    tinyworlds.git_commit      commit of the code (also mlflow.source.git.commit)
    tinyworlds.pipeline_run    one id per `dvc repro` / `dvc exp run` invocation
    tinyworlds.pipeline        that pipeline run's name (DVC experiment, or repro + commit + time)
    tinyworlds.dvc_experiment  DVC experiment name, under `dvc exp run`
    tinyworlds.final_metrics   which metrics are the final ones (what `tinyworlds runs` shows)
    tinyworlds.model.<kind>    sha256 of the model.safetensors the run trained
Runs are named `stage · datasets · experiment`. The stages of one pipeline run are children of
one parent run (tagged tinyworlds.parent) named after the pipeline, and the experiment
carries the views the MLflow UI opens on (`ui`).

Modules: `store` (where), `lineage` (who), `naming` (run and metric names), `flatten`
(params), `run` (the stage run), `models` (attached models, fetched back for play/dream),
`ui` (what the MLflow UI shows), `report` (`tinyworlds runs`), `tags`. mlflow is imported
inside functions: importing it takes about a second.
"""
