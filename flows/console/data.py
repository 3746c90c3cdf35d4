"""`kimi-label prepare-training-data` and `kimi-label evaluate`: what users do with a labelled
output. Options are the specs' fields (`pipelines.training_data`, `pipelines.evaluation`)."""

from __future__ import annotations

import argparse
import sys

from flows.console.options import add_model_options, add_nested_options, model_from_args
from flows.console.running import check_prefect_api, prefect_defaults, run_flow_here


def add_commands(commands) -> None:
    from pipelines.evaluation import EvaluationSpec
    from pipelines.training_data import FILTER_OPTIONS, TrainingDataSpec

    p = commands.add_parser("prepare-training-data",
                            help="train/validation shards + manifest from a labelled output",
                            description="Train/validation shards and manifest.json from a "
                                        "labelled output made with --semantic-tokens.")
    add_model_options(p, TrainingDataSpec)
    add_nested_options(p, TrainingDataSpec, "filters", FILTER_OPTIONS)
    p.set_defaults(run=prepare_training_data)
    p = commands.add_parser("evaluate", help="score a labelled output against reference labels "
                                             "(a table, report.json, confusion.png)",
                            description="Score a labelled output against reference labels, in "
                                        "this process (the evaluate flow is for deployments).")
    add_model_options(p, EvaluationSpec)
    p.set_defaults(run=evaluate)


def prepare_training_data(args: argparse.Namespace) -> int:
    prefect_defaults()
    from pipelines.training_data import (TrainingDataSpec, check_training_data,
                                         format_training_data)

    from flows.credentials import with_credentials_read

    spec = model_from_args(TrainingDataSpec, args)
    check_prefect_api()
    check_training_data(with_credentials_read(spec))  # as the flow will (exit 2 here)
    from flows.prepare_training_data import prepare_training_data as flow

    print(format_training_data(run_flow_here(flow, spec, "prepare-training-data")))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from pipelines.evaluation import (EvaluationSpec, check_inputs, format_summary,
                                      no_match_message, write_report)
    from pipelines.evaluation import evaluate as score

    from flows.credentials import with_credentials_read

    spec = with_credentials_read(model_from_args(EvaluationSpec, args))
    report = score(spec, check_inputs(spec))
    write_report(report, spec)
    print(format_summary(report))
    refusal = no_match_message(report)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    return 0
