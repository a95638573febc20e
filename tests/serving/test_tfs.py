"""TF Serving's command line and config rules, as ``serving local`` applies them."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.tfs import TfsConfigError, parse_channel_arguments, parse_command_line, parse_flags

MODELS = """
model_config_list {
  config {
    name: "inception"
    base_path: "/models/inception"
    model_platform: "tensorflow"
    model_version_policy { latest { num_versions: 2 } }
  }
}
"""

# What serving/config/batching.config held before: accepted by
# CreateBasicBatchingSession (splitting on, last allowed size equal to
# max_execution_batch_size) but refused by the model server's
# WrapSessionForBatching.
SPLITTING_256 = """
max_batch_size { value: 256 }
allowed_batch_sizes: 32
allowed_batch_sizes: 64
enable_large_batch_splitting { value: true }
max_execution_batch_size { value: 64 }
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def batching_args(tmp_path: Path, text: str) -> list[str]:
    return [
        f"--model_config_file={write(tmp_path, 'models.config', MODELS)}",
        "--enable_batching",
        f"--batching_parameters_file={write(tmp_path, 'batching.config', text)}",
    ]


def test_flag_forms_follow_tensorflows_parser() -> None:
    flags, rest = parse_flags(
        ["--port=9000", "--enable_batching", "--enable_model_warmup=false", "--model_name=m"]
    )
    assert flags == {
        "port": 9000,
        "enable_batching": True,
        "enable_model_warmup": False,
        "model_name": "m",
    }
    assert rest == []
    # A value after a space is not the flag's: both words are left over.
    flags, rest = parse_flags(["--model_name", "m", "--frobnicate=1"])
    assert flags == {}
    assert rest == ["--model_name", "m", "--frobnicate=1"]


@pytest.mark.parametrize(
    "arg", ["--port=eighty", "--enable_batching=yes", "--enable_batching=1", "--port="]
)
def test_values_that_do_not_parse_are_refused(arg: str) -> None:
    with pytest.raises(TfsConfigError, match="Couldn't interpret value"):
        parse_flags([arg])


def test_unimplemented_flags_are_refused_when_set_and_accepted_at_their_default() -> None:
    with pytest.raises(TfsConfigError, match="not supported here"):
        parse_flags(["--ssl_config_file=/etc/ssl.config"])
    flags, _ = parse_flags(["--use_alts_credentials=false"])
    assert flags == {"use_alts_credentials": False}


def test_the_old_splitting_config_fails_every_load_with_tf_servings_message(
    tmp_path: Path,
) -> None:
    # The server starts; each version's load is what fails (WrapSessionForBatching).
    options = parse_command_line(batching_args(tmp_path, SPLITTING_256))
    assert options.load_error == (
        "Last entry in allowed_batch_sizes must match max_batch_size; "
        "last entry was 64; expected 256"
    )
    assert (options.load_retries, options.load_retry_interval_s) == (5, 60.0)


def test_a_consistent_batching_config_gives_the_queues_limits(tmp_path: Path) -> None:
    options = parse_command_line(
        batching_args(
            tmp_path,
            "max_batch_size { value: 64 }\nallowed_batch_sizes: 32\nallowed_batch_sizes: 64\n"
            "max_enqueued_batches { value: 3 }\nnum_batch_threads { value: 2 }\n",
        )
    )
    assert options.batching is not None
    assert options.load_error is None
    assert options.batching.max_batch_size == 64
    assert options.batching.capacity == 3 * 64
    assert options.batching.num_batch_threads == 2


def test_allowed_sizes_default_to_the_schedulers_input_limit(tmp_path: Path) -> None:
    # No max_batch_size: the queue's default input_batch_size_limit (1000).
    options = parse_command_line(batching_args(tmp_path, "allowed_batch_sizes: 64\n"))
    assert options.load_error is not None
    assert "last entry was 64; expected 1000" in options.load_error


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("num_batch_threads { value: 0 }", "num_batch_threads must be positive; was 0"),
        ("max_batch_sizes { value: 3 }", "Invalid protobuf file"),
    ],
)
def test_start_up_refuses_the_scheduler_and_unparsable_files(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(TfsConfigError, match=message):
        parse_command_line(batching_args(tmp_path, text))


SPLIT = "enable_large_batch_splitting { value: true }\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SPLIT + "max_enqueued_batches { value: 0 }", "max_enqueued_batches must be positive"),
        ("batch_timeout_micros { value: -1 }", "batch_timeout_micros must be non-negative"),
        (
            "max_batch_size { value: 32 }\n" + SPLIT + "max_execution_batch_size { value: 64 }",
            "input_batch_size_limit must be greater than or equal to max_execution_batch_size",
        ),
    ],
)
def test_queue_rules_fail_the_load(tmp_path: Path, text: str, message: str) -> None:
    options = parse_command_line(batching_args(tmp_path, text))
    assert options.load_error is not None
    assert message in options.load_error


def test_no_queued_batches_without_splitting_means_one(tmp_path: Path) -> None:
    # shared_batch_scheduler.h AddQueue rewrites 0 to 1 when splitting is off.
    options = parse_command_line(batching_args(tmp_path, "max_enqueued_batches { value: 0 }"))
    assert options.load_error is None


def test_batching_file_without_enable_batching_is_refused(tmp_path: Path) -> None:
    args = batching_args(tmp_path, "max_batch_size { value: 8 }")
    args.remove("--enable_batching")
    with pytest.raises(TfsConfigError, match=r"without setting server_options\.enable_batching"):
        parse_command_line(args)


@pytest.mark.parametrize(
    ("models", "message"),
    [
        (MODELS.replace("/models/inception", "models/inception"), "absolute path or URI"),
        (MODELS + MODELS, "Invalid protobuf file"),  # model_config_list twice
        (MODELS.replace('"tensorflow"', '"onnx"'), "requests unsupported platform onnx"),
        (MODELS.replace('model_platform: "tensorflow"', ""), "Illegal setting neither"),
        (
            MODELS.replace(
                'model_platform: "tensorflow"',
                'model_platform: "tensorflow" version_labels { key: "stable" value: 1 }',
            ),
            "Request to assign label to version 1 of model inception, which is not currently",
        ),
    ],
)
def test_model_config_rules(tmp_path: Path, models: str, message: str) -> None:
    args = [f"--model_config_file={write(tmp_path, 'models.config', models)}"]
    with pytest.raises(TfsConfigError, match=message):
        parse_command_line(args)


def test_a_model_listed_twice_is_refused(tmp_path: Path) -> None:
    config = MODELS.replace(
        "model_config_list {",
        'model_config_list {\n  config { name: "inception" base_path: "/m" '
        'model_platform: "tensorflow" }',
    )
    args = [f"--model_config_file={write(tmp_path, 'models.config', config)}"]
    with pytest.raises(TfsConfigError, match="Illegal to list model inception multiple times"):
        parse_command_line(args)


def test_no_model_at_all_is_refused() -> None:
    with pytest.raises(TfsConfigError, match="are empty!"):
        parse_command_line(["--enable_batching"])


def test_single_model_flags_use_the_default_version_policy() -> None:
    options = parse_command_line(["--model_base_path=/models/x", "--model_name=x"])
    (model,) = options.models
    assert (model.name, str(model.base_path), model.policy) == ("x", "/models/x", "latest 1")
    assert model.choose([1, 2, 3]) == [3]
    assert options.batching is None
    assert not options.health_service


def test_version_policy_of_the_config(tmp_path: Path) -> None:
    args = [f"--model_config_file={write(tmp_path, 'models.config', MODELS)}"]
    (model,) = parse_command_line(args).models
    assert model.choose([1, 4, 7]) == [4, 7]
    specific = MODELS.replace("latest { num_versions: 2 }", "specific { versions: 1 versions: 7 }")
    args = [f"--model_config_file={write(tmp_path, 'models.config', specific)}"]
    (model,) = parse_command_line(args).models
    assert model.choose([1, 4, 7]) == [1, 7]


def test_channel_arguments_are_ints_when_they_parse() -> None:
    assert parse_channel_arguments("grpc.max_connection_age_ms=30000,grpc.x=abc") == [
        ("grpc.max_connection_age_ms", 30000),
        ("grpc.x", "abc"),
    ]
    with pytest.raises(TfsConfigError, match="not key=value"):
        parse_channel_arguments("grpc.max_connection_age_ms")


def test_rest_port_and_monitoring(tmp_path: Path) -> None:
    monitoring = write(tmp_path, "monitoring.config", "prometheus_config { enable: true }")
    base = ["--model_base_path=/m", f"--monitoring_config_file={monitoring}"]
    options = parse_command_line([*base, "--rest_api_port=8501"])
    assert options.rest_api_port == 8501
    assert options.prometheus_path == "/monitoring/prometheus/metrics"
    # The same port as gRPC: TF Serving logs an error and skips REST.
    options = parse_command_line([*base, "--rest_api_port=8500", "--port=8500"])
    assert options.rest_api_port == 0 and options.prometheus_path is None


def test_parallelism_flags_cannot_all_be_set() -> None:
    with pytest.raises(TfsConfigError, match="You cannot configure all"):
        parse_command_line(
            [
                "--model_base_path=/m",
                "--tensorflow_intra_op_parallelism=2",
                "--tensorflow_inter_op_parallelism=2",
                "--tensorflow_session_parallelism=2",
            ]
        )
    options = parse_command_line(["--model_base_path=/m", "--tensorflow_session_parallelism=3"])
    assert (options.intra_op_threads, options.inter_op_threads) == (3, 3)


def test_every_flag_of_main_cc_is_known() -> None:
    # Accepted with TF Serving's meaning, or refused as not supported here;
    # never an "unknown argument" that a real server would take.
    flags, rest = parse_flags(
        [
            "--mixed_precision=bfloat16",
            "--skip_initialize_tpu",
            "--remove_unused_fields_from_bundle_metagraph=false",
            "--allow_version_labels_for_unavailable_models=false",
            "--xla_gpu_compilation_enabled=false",
        ]
    )
    assert rest == []
    assert flags["mixed_precision"] == "bfloat16"
    with pytest.raises(TfsConfigError, match="not supported here"):
        parse_flags(["--enable_per_model_batching_parameters"])


def test_help_lists_tf_servings_flags() -> None:
    from serving.tfs import FLAGS, flags_help

    text = flags_help()
    assert all(f"--{name} " in text for name in FLAGS)
