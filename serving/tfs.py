"""TF Serving's command line and config files, read and checked as TF Serving does.

``serving local`` accepts ``tensorflow_model_server``'s flags so that the
container spec in ``k8s/31-tf-serving.yaml`` runs unchanged on a machine
without TF Serving (the local cluster does exactly that). Every rule here is
one TF Serving applies, with its message, and names the file and function
it comes from (github.com/tensorflow/serving, and tensorflow/tensorflow for
the batch scheduler). A flag TF Serving has but ``serving local`` does not
implement is refused when set ("not supported here"), never ignored.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from labelmill.errors import UsageError
from serving.tfs_protos import BatchingParameters, MonitoringConfig


class TfsConfigError(UsageError):
    """A command line or config file that TF Serving itself would refuse."""


@dataclass(frozen=True)
class Flag:
    kind: type
    default: Any
    supported: bool = True


_CPUS = os.cpu_count() or 1


def flags_help() -> str:
    """TF Serving's flags as ``serving local --help`` lists them, after its own."""
    lines = ["TF Serving's flags (--name=value; a bool also bare), with TF Serving's defaults:"]
    for name, flag in FLAGS.items():
        note = "" if flag.supported else "  (not supported here: refused when set)"
        default = "''" if flag.default == "" else flag.default
        if flag.kind is bool:
            default = str(flag.default).lower()
        lines.append(f"  --{name}  {flag.kind.__name__}, default {default}{note}")
    return "\n".join(lines)


# tensorflow_serving/model_servers/main.cc main() (flag_list) with the defaults
# of tensorflow_serving/model_servers/server.h Server::Options.
FLAGS: dict[str, Flag] = {
    "port": Flag(int, 8500),
    "rest_api_port": Flag(int, 0),
    "rest_api_num_threads": Flag(int, 4 * _CPUS),
    "rest_api_timeout_in_ms": Flag(int, 30000),
    "enable_batching": Flag(bool, False),
    "batching_parameters_file": Flag(str, ""),
    "model_config_file": Flag(str, ""),
    "model_name": Flag(str, "default"),
    "model_base_path": Flag(str, ""),
    "file_system_poll_wait_seconds": Flag(int, 1),
    "monitoring_config_file": Flag(str, ""),
    "enable_grpc_healthcheck_service": Flag(bool, False),
    "grpc_channel_arguments": Flag(str, ""),
    "grpc_max_threads": Flag(int, 4 * _CPUS),
    "tensorflow_session_parallelism": Flag(int, 0),
    "tensorflow_intra_op_parallelism": Flag(int, 0),
    "tensorflow_inter_op_parallelism": Flag(int, 0),
    "enable_model_warmup": Flag(bool, True),
    "saved_model_tags": Flag(str, "serve"),
    "flush_filesystem_caches": Flag(bool, True),
    "num_load_threads": Flag(int, 0),
    "num_unload_threads": Flag(int, 0),
    "max_num_load_retries": Flag(int, 5),
    "load_retry_interval_micros": Flag(int, 60_000_000),
    # saved_model_bundle_factory.cc InternalCreateSavedModelBundle: only
    # "bfloat16" is acted on (oneDNN auto mixed precision); others are logged.
    "mixed_precision": Flag(str, ""),
    # Accepted with no effect here: there is no TPU to initialise, and the
    # served signatures do not change when unused MetaGraph fields are dropped.
    "skip_initialize_tpu": Flag(bool, False),
    "remove_unused_fields_from_bundle_metagraph": Flag(bool, True),
    "allow_version_labels_for_unavailable_models": Flag(bool, False, supported=False),
    "thread_pool_factory_config_file": Flag(str, "", supported=False),
    "num_tflite_pools": Flag(int, _CPUS, supported=False),
    "num_tflite_interpreters_per_pool": Flag(int, 1, supported=False),
    "xla_gpu_compilation_enabled": Flag(bool, False, supported=False),
    "version": Flag(bool, False, supported=False),
    "grpc_socket_path": Flag(str, "", supported=False),
    "rest_api_enable_cors_support": Flag(bool, False, supported=False),
    "enable_per_model_batching_parameters": Flag(bool, False, supported=False),
    "model_config_file_poll_wait_seconds": Flag(int, 0, supported=False),
    "tensorflow_session_config_file": Flag(str, "", supported=False),
    "use_alts_credentials": Flag(bool, False, supported=False),
    "ssl_config_file": Flag(str, "", supported=False),
    "platform_config_file": Flag(str, "", supported=False),
    "per_process_gpu_memory_fraction": Flag(float, 0.0, supported=False),
    "num_request_iterations_for_warmup": Flag(int, 0, supported=False),
    "prefer_tflite_model": Flag(bool, False, supported=False),
    "enable_profiler": Flag(bool, True, supported=False),
    "xla_cpu_compilation_enabled": Flag(bool, False, supported=False),
    "enable_signature_method_name_check": Flag(bool, False, supported=False),
    "enable_serialization_as_tensor_content": Flag(bool, False, supported=False),
}


def _parse_value(name: str, kind: type, raw: str | None) -> Any:
    # tensorflow/tsl/util/command_line_flags.cc ParseInt32Flag/ParseStringFlag/
    # ParseBoolFlag: "--name=value"; a bool also takes a bare "--name" and
    # true/false/1/0. Anything else: "Couldn't interpret value ... for flag ...".
    if kind is bool:
        if raw is None:
            return True
        # tensorflow/core/util/command_line_flags.cc ParseBoolFlag: exactly
        # "=true" or "=false"; "=1", "=True" are parse errors.
        if raw == "true":
            return True
        if raw == "false":
            return False
    elif raw is not None:
        try:
            return kind(raw) if kind is not str else raw
        except ValueError:
            pass
    raise TfsConfigError(f"Couldn't interpret value {raw} for flag {name}.")


def parse_flags(args: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """TF Serving flags given in ``args`` (only those set) and the arguments left over.

    Like tensorflow::Flags::Parse, a flag takes its value after ``=`` only;
    unknown arguments are returned, and main.cc reports them ("unknown
    argument") and carries on.
    """
    values: dict[str, Any] = {}
    rest: list[str] = []
    for arg in args:
        name, eq, raw = arg.removeprefix("--").partition("=")
        flag = FLAGS.get(name) if arg.startswith("--") else None
        if flag is None or (flag.kind is not bool and not eq):
            # Only a bool matches without "=": "--port 8500" is two unknown words.
            rest.append(arg)
            continue
        value = _parse_value(name, flag.kind, raw if eq else None)
        if not flag.supported and value != flag.default:
            raise TfsConfigError(
                f"--{name} is a TF Serving flag that serving local does not implement "
                "(not supported here); run the real tensorflow_model_server for it"
            )
        values[name] = value
    return values, rest


def read_text_proto(path: str, message: Any) -> Any:
    """tensorflow_serving/util/proto_util.h ParseProtoTextFile, same message on failure."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise TfsConfigError(f"{path}; {exc.strerror or exc}") from None
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise TfsConfigError(f"Invalid protobuf file: '{path}' ({exc})") from None
    return message


# -- model config -------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve: its name, base folder and which versions to load."""

    name: str
    base_path: Path
    choose: Callable[[list[int]], list[int]]
    policy: str


def _version_policy(config: Any) -> tuple[Callable[[list[int]], list[int]], str]:
    # tensorflow_serving/sources/storage_path/file_system_storage_path_source.cc
    # AspireVersions: latest (num_versions, at least 1; also when no policy is
    # set), all, or specific versions.
    policy = config.model_version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return (lambda versions: list(versions)), "all"
    if which == "specific":
        wanted = set(policy.specific.versions)
        return (lambda versions: [v for v in versions if v in wanted]), (
            f"specific {sorted(wanted)}"
        )
    keep = max(policy.latest.num_versions, 1) if which == "latest" else 1
    return (lambda versions: list(versions)[-keep:]), f"latest {keep}"


def _is_relative(uri: str) -> bool:
    # server_core.cc UriIsRelativePath: no scheme, no host, not absolute.
    return "://" not in uri and not uri.startswith("/")


def load_models(flags: dict[str, Any]) -> list[ModelSpec]:
    """The models TF Serving would serve for these flags, checked as it checks them."""
    config_file = flags.get("model_config_file", "")
    base = flags.get("model_base_path", "")
    if not config_file and not base:
        # server.cc Server::BuildAndStart
        raise TfsConfigError(
            "Both server_options.model_base_path and server_options.model_config_file are empty!"
        )
    if not config_file:
        # server.cc BuildSingleModelConfig: one model, the default version policy.
        server_config = model_server_config_pb2.ModelServerConfig()
        single = server_config.model_config_list.config.add()
        single.name = flags.get("model_name", FLAGS["model_name"].default)
        single.base_path = base
        single.model_platform = "tensorflow"
    else:
        server_config = read_text_proto(config_file, model_server_config_pb2.ModelServerConfig())
    if server_config.WhichOneof("config") == "custom_model_config":
        raise TfsConfigError("custom_model_config is not supported here; use model_config_list")
    configs = list(server_config.model_config_list.config)
    names: set[str] = set()
    for c in configs:
        # server_core.cc ValidateModelConfigList: unique names, absolute base paths.
        if c.name in names:
            raise TfsConfigError(f"Illegal to list model {c.name} multiple times in config list")
        names.add(c.name)
    for c in configs:
        if _is_relative(c.base_path):
            raise TfsConfigError(
                f"Expected model {c.name} to have an absolute path or URI; "
                f"got base_path()={c.base_path}"
            )
    specs = []
    for c in configs:
        # server_core.cc GetPlatform and CreateStoragePathRoutes.
        if c.model_type and c.model_platform:
            raise TfsConfigError(
                "Illegal setting both ModelServerConfig::model_type (deprecated) and "
                f"ModelServerConfig::model_platform, model name is {c.name}"
            )
        platform = "tensorflow" if c.model_type == 1 else c.model_platform
        if not platform:
            raise TfsConfigError(
                "Illegal setting neither ModelServerConfig::model_type (deprecated) nor "
                f"ModelServerConfig::model_platform, model name is {c.name}"
            )
        if platform != "tensorflow":
            raise TfsConfigError(f"Model {c.name} requests unsupported platform {platform}")
        if "://" in c.base_path:
            raise TfsConfigError(
                f"model {c.name}: base_path {c.base_path} is a URI; serving local reads "
                "local folders only (not supported here)"
            )
        for label, version in sorted(c.version_labels.items()):
            # server_core.cc ServerCore::ReloadConfig runs UpdateModelVersionLabelMap
            # before it adds the models, so on the first config no version is
            # loaded yet and every label is refused (unless
            # --allow_version_labels_for_unavailable_models, not supported here).
            raise TfsConfigError(
                f"Request to assign label to version {version} of model {c.name}, which is "
                f"not currently available for inference (label {label!r})"
            )
        choose, policy = _version_policy(c)
        specs.append(ModelSpec(c.name, Path(c.base_path), choose, policy))
    if len(specs) != 1:
        raise TfsConfigError(
            f"the model config lists {len(specs)} models; serving local serves exactly one "
            "(not supported here)"
        )
    return specs


# -- batching -----------------------------------------------------------------


@dataclass(frozen=True)
class Batching:
    """The limits a batching queue enforces on each request (``--enable_batching``)."""

    max_batch_size: int
    max_execution_batch_size: int
    max_enqueued_batches: int
    num_batch_threads: int
    batch_timeout_micros: int

    @property
    def capacity(self) -> int:
        """Images that may wait in the queue before it answers UNAVAILABLE."""
        return self.max_enqueued_batches * self.max_execution_batch_size


def check_batching(params: Any) -> Batching:
    """The batch queue's limits, refusing what TF Serving's start-up refuses.

    The model server (not CreateBasicBatchingSession) wraps each session in
    bundle_factory_util.cc WrapSessionForBatching, with the queue from
    bundle_factory_util.h GetQueueOptions on a scheduler from
    CreateBatchScheduler. Only the scheduler's own check runs at start-up;
    the queue's run when a version loads (``check_batching_at_load``).
    """
    # tensorflow/core/kernels/batching_util/shared_batch_scheduler.h: Options
    # and QueueOptions defaults (num_batch_threads = MaxParallelism()).
    max_batch = params.max_batch_size.value if params.HasField("max_batch_size") else 1000
    timeout = params.batch_timeout_micros.value if params.HasField("batch_timeout_micros") else 0
    enqueued = params.max_enqueued_batches.value if params.HasField("max_enqueued_batches") else 10
    threads = params.num_batch_threads.value if params.HasField("num_batch_threads") else _CPUS
    splitting = (
        params.HasField("enable_large_batch_splitting")
        and params.enable_large_batch_splitting.value
    )
    # bundle_factory_util.h GetQueueOptions: without splitting the execution
    # batch is the input batch; with it, max_execution_batch_size or else max_batch_size.
    execution = max_batch
    if splitting and params.HasField("max_execution_batch_size"):
        execution = params.max_execution_batch_size.value

    # shared_batch_scheduler.h SharedBatchScheduler::AddQueue: "max_enqueued_batches
    # == 0" means 1 when splitting is off.
    if not splitting and enqueued == 0:
        enqueued = 1
    # shared_batch_scheduler.h SharedBatchScheduler::Create (at server start)
    if threads <= 0:
        raise TfsConfigError(f"num_batch_threads must be positive; was {threads}")
    return Batching(max_batch, execution, enqueued, threads, timeout)


def check_batching_at_load(params: Any, batching: Batching) -> None:
    """Refuse what loading a model version with these parameters refuses.

    These checks run per model version when TF Serving loads it
    (saved_model_bundle_factory.cc InternalCreateSavedModelBundle ->
    bundle_factory_util.cc WrapSessionForBatching), so the version fails to
    load and the server retries it, not the start-up.
    """
    max_batch, execution = batching.max_batch_size, batching.max_execution_batch_size
    timeout, enqueued = batching.batch_timeout_micros, batching.max_enqueued_batches
    splitting = (
        params.HasField("enable_large_batch_splitting")
        and params.enable_large_batch_splitting.value
    )
    # bundle_factory_util.cc WrapSessionForBatching
    allowed = list(params.allowed_batch_sizes)
    if allowed and allowed[-1] != max_batch:
        raise TfsConfigError(
            "Last entry in allowed_batch_sizes must match max_batch_size; last entry was "
            f"{allowed[-1]}; expected {max_batch}"
        )
    # shared_batch_scheduler.h SharedBatchScheduler::AddQueue
    if max_batch <= 0:
        raise TfsConfigError(f"input_batch_size_limit must be positive; was {max_batch}")
    if timeout < 0:
        raise TfsConfigError(f"batch_timeout_micros must be non-negative; was {timeout}")
    # AddQueue first turns 0 into 1 when splitting is off.
    if splitting and enqueued <= 0:
        raise TfsConfigError(f"max_enqueued_batches must be positive; was {enqueued}")
    if splitting and max_batch < execution:
        raise TfsConfigError(
            "When enable_large_batch_splitting is true, input_batch_size_limit must be "
            f"greater than or equal to max_execution_batch_size.1{max_batch}{execution}"
        )


# -- the whole command line ---------------------------------------------------


@dataclass(frozen=True)
class TfsOptions:
    """What ``serving local`` needs from a TF Serving command line."""

    models: list[ModelSpec]
    port: int
    rest_api_port: int
    batching: Batching | None
    health_service: bool
    poll_s: float | None  # None: load once, never poll
    channel_arguments: list[tuple[str, int | str]]
    grpc_max_threads: int
    intra_op_threads: int
    inter_op_threads: int
    prometheus_path: str | None
    # main.cc --max_num_load_retries / --load_retry_interval_micros: a failed
    # version load is tried this many more times, this far apart.
    load_retries: int = 5
    load_retry_interval_s: float = 60.0
    # Why every version load fails (a batching config that only a load checks).
    load_error: str | None = None
    mixed_precision: str = ""
    unknown: list[str] = field(default_factory=list)


def parse_channel_arguments(raw: str) -> list[tuple[str, int | str]]:
    """server.cc parseGrpcChannelArgs and BuildAndStart: ``k=v,...``; int when it parses."""
    result: list[tuple[str, int | str]] = []
    for item in raw.split(","):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq:
            raise TfsConfigError(f"--grpc_channel_arguments entry {item!r} is not key=value")
        try:
            result.append((key, int(value)))
        except ValueError:
            result.append((key, value))
    return result


def build_options(flags: dict[str, Any], unknown: Sequence[str] = ()) -> TfsOptions:
    """Check a parsed TF Serving command line the way Server::BuildAndStart does."""

    def get(name: str) -> Any:
        return flags.get(name, FLAGS[name].default)

    # server.cc Server::BuildAndStart, in its order.
    if get("port") == 0:
        raise TfsConfigError(
            "At least one of server_options.grpc_port or server_options.grpc_socket_path "
            "must be set."
        )
    models = load_models(flags)
    batching = None
    load_error = None
    if get("enable_batching"):
        params = BatchingParameters()
        if get("batching_parameters_file"):
            read_text_proto(get("batching_parameters_file"), params)
        batching = check_batching(params)
        try:
            check_batching_at_load(params, batching)
        except TfsConfigError as exc:
            load_error = str(exc)
    elif get("batching_parameters_file"):
        raise TfsConfigError(
            "server_options.batching_parameters_file is set without setting "
            "server_options.enable_batching to true."
        )
    intra, inter = get("tensorflow_intra_op_parallelism"), get("tensorflow_inter_op_parallelism")
    session = get("tensorflow_session_parallelism")
    if intra > 0 and inter > 0 and session > 0:
        raise TfsConfigError(
            "Either configure server_options.tensorflow_session_parallelism or "
            "(server_options.tensorflow_intra_op_parallelism, "
            "server_options.tensorflow_inter_op_parallelism) separately. "
            "You cannot configure all."
        )
    if intra <= 0 and inter <= 0:
        intra = inter = session
    if get("saved_model_tags") != "serve":
        raise TfsConfigError("--saved_model_tags other than 'serve' is not supported here")
    channel_arguments = parse_channel_arguments(get("grpc_channel_arguments"))
    prometheus = None
    rest = get("rest_api_port")
    # server.cc BuildAndStart: the monitoring config is read only when the REST
    # port is set (and differs from the gRPC port; else REST is skipped with an error log).
    if rest != 0 and rest != get("port"):
        monitoring = MonitoringConfig()
        if get("monitoring_config_file"):
            read_text_proto(get("monitoring_config_file"), monitoring)
        if monitoring.prometheus_config.enable:
            # http_server.cc CreateAndStartHttpServer: PrometheusExporter::kPrometheusPath.
            prometheus = monitoring.prometheus_config.path or "/monitoring/prometheus/metrics"
    elif rest != 0:
        rest = 0
    poll = get("file_system_poll_wait_seconds")
    if poll < 0:
        raise TfsConfigError(
            "--file_system_poll_wait_seconds below 0 (no polling at all) is not supported here"
        )
    return TfsOptions(
        models=models,
        port=get("port"),
        rest_api_port=rest,
        batching=batching,
        health_service=bool(get("enable_grpc_healthcheck_service")),
        # file_system_storage_path_source.h: 0 polls exactly once.
        poll_s=float(poll) if poll > 0 else None,
        channel_arguments=channel_arguments,
        grpc_max_threads=max(1, get("grpc_max_threads")),
        intra_op_threads=max(0, intra),
        inter_op_threads=max(0, inter),
        prometheus_path=prometheus,
        load_retries=max(0, get("max_num_load_retries")),
        load_retry_interval_s=max(0, get("load_retry_interval_micros")) / 1e6,
        load_error=load_error,
        mixed_precision=get("mixed_precision"),
        unknown=list(unknown),
    )


def parse_command_line(args: Sequence[str]) -> TfsOptions:
    """Flags, config files and rules in one step: what TF Serving would run, or why not."""
    flags, unknown = parse_flags(args)
    return build_options(flags, unknown)
