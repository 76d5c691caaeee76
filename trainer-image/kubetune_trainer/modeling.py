"""The model stage: load the base model (4/8-bit for qlora) and apply the fine-tuning method."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubetune.api import ADAPTER_METHODS, LORA_METHODS, FineTuneJobSpec
from kubetune_trainer import hub, storage
from kubetune_trainer.errors import SpecError, TrainerError
from kubetune_trainer.model_cache import ModelCache

log = logging.getLogger(__name__)

# Non-reentrant activation checkpointing: the recommended mode, and the only one in future torch.
NON_REENTRANT = {"use_reentrant": False}


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained reads: a local directory or a Hub id, and a GGUF file in it."""

    path: str
    gguf_file: str | None = None
    revision: str | None = None


def hf_repo(uri: str) -> tuple[str, str | None]:
    """hf://org/name[/file] -> ("org/name", "file" or None)."""
    parts = uri.removeprefix("hf://").split("/", 2)
    return "/".join(parts[:2]), parts[2] if len(parts) > 2 else None


def locate_model(
    uri: str, revision: str | None, cache: Path, shared: ModelCache | None = None
) -> ModelSource:
    """Resolves the model URI to something from_pretrained can read, staging remote files:
    through the shared model cache when there is one (the model is fetched once for all runs),
    else hf:// models straight from the Hub and others into the pod's cache."""
    if uri.startswith("file://"):
        path = Path(urlsplit(uri).path)
        if not path.exists():
            raise SpecError(f"spec.model.uri: {uri} does not exist")
        if path.suffix == ".gguf":
            return ModelSource(str(path.parent), path.name)
        return ModelSource(str(path))
    if uri.startswith("hf://"):
        repo, file = hf_repo(uri)
        if shared is None:
            return ModelSource(repo, file, revision)
        entry = shared.get(uri, revision, lambda target: hub.download(repo, file, revision, target))
        return ModelSource(str(entry), file)
    file = Path(urlsplit(uri).path).name if uri.endswith(".gguf") else None
    if shared is not None:
        return ModelSource(str(shared.get(uri, revision, lambda t: _stage(uri, t))), file)
    target = cache / "model" / hashlib.sha256(uri.encode()).hexdigest()[:12]
    _stage(uri, target)
    return ModelSource(str(target), file)


def _stage(uri: str, target: Path) -> None:
    """A model in object storage (a prefix, or one .gguf file) copied into target."""
    try:
        if uri.endswith(".gguf"):
            storage.download(uri, target / Path(urlsplit(uri).path).name)
            return
        if not storage.list_keys(uri):
            raise SpecError(f"spec.model.uri: nothing stored under {uri}")
        storage.download(uri, target)
    except FileNotFoundError as exc:
        raise SpecError(f"spec.model.uri: {uri} does not exist") from exc


def _from_pretrained(loader: Any, source: ModelSource, trust: bool, **kwargs: Any) -> Any:
    try:
        return loader.from_pretrained(
            source.path,
            gguf_file=source.gguf_file,
            revision=source.revision,
            trust_remote_code=trust,
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if is_connection_problem(exc):
            # The Hub or the network is down: a retry may succeed, so not an invalid spec.
            raise TrainerError(f"spec.model.uri: cannot reach {source.path}: {first}") from exc
        raise SpecError(f"spec.model.uri: cannot load {source.path}: {first}") from exc


def is_connection_problem(exc: BaseException) -> bool:
    """Whether exc (or what caused it) is a failure to reach a server rather than a bad name."""
    seen: BaseException | None = exc
    while seen is not None:
        if (
            isinstance(seen, ConnectionError | TimeoutError)
            or "couldn't connect" in str(seen).lower()
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def materialize_gguf(source: ModelSource, cache: Path, trust: bool = False) -> ModelSource:
    """A GGUF model dequantized once into a safetensors directory (reused on later runs)."""
    if source.gguf_file is None:
        return source
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = hashlib.sha256(f"{source.path}/{source.gguf_file}/{source.revision}".encode()).hexdigest()
    target = cache / "gguf" / key[:16]
    if (target / "config.json").exists():
        return ModelSource(str(target))
    log.info("Converting GGUF model once file=%s target=%s", source.gguf_file, target)
    tokenizer = _from_pretrained(AutoTokenizer, source, trust)
    model = _from_pretrained(AutoModelForCausalLM, source, trust)
    # A dequantized GGUF model is a plain float model; drop the GGUF quantizer so it saves as such.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_suffix(".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return ModelSource(str(target))


def load_tokenizer(source: ModelSource, trust: bool) -> Any:
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, source, trust)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# Methods whose frozen base trains in bfloat16 under model.dtype auto on a CPU that multiplies
# bfloat16 natively: their trained weights stay float32 (PEFT keeps adapters in float32), as the
# master copies of the bfloat16 autocast they train under (training.training_arguments),
# measured faster at the same exactMatch (docs/benchmarks.md). Not full fine-tuning (bfloat16
# weights updated with no float32 master copy lose small updates) and not qlora (float32 on a
# CPU: resolve_dtype).
CPU_BF16_METHODS = frozenset({"lora", "dora", "ia3", "prefix", "prompt"})


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AMX or AVX512-BF16), which oneDNN uses
    for torch's bfloat16 matmuls; without them bfloat16 is emulated and slower than float32.
    torch has no public query: its private one, and False where that is missing."""
    import torch

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_dtype(spec: FineTuneJobSpec) -> tuple[str, str]:
    """The precision the base model is loaded in (a torch dtype's name) and why, where the spec
    did not name it (auto) or it is not the one named (qlora on a CPU)."""
    import torch

    name = spec.model.dtype
    cuda = torch.cuda.is_available()
    if spec.method.type == "qlora" and not cuda and name != "float32":
        # bitsandbytes computes in float32 on CPUs (no bf16 matmuls in its autograd).
        auto = "auto: " if name == "auto" else f"not {name}: "
        return "float32", f"{auto}qlora computes in float32 on a CPU (bitsandbytes)"
    if name != "auto":
        return name, ""
    if cuda:
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: the GPU supports bfloat16"
        return "float32", "auto: the GPU has no bfloat16"
    if spec.method.type not in CPU_BF16_METHODS:
        method = "full fine-tuning" if spec.method.type == "full" else spec.method.type
        return "float32", f"auto: {method} trains in float32 on a CPU"
    if cpu_multiplies_bf16():
        return "bfloat16", "auto: this CPU multiplies bfloat16 natively (AMX or AVX512-BF16)"
    return "float32", "auto: this CPU has no bfloat16 matrix instructions"


def torch_dtype(spec: FineTuneJobSpec) -> Any:
    import torch

    return getattr(torch, resolve_dtype(spec)[0])


def load_model(spec: FineTuneJobSpec, source: ModelSource) -> Any:
    """The base model, quantized for qlora, ready for the method to be applied."""
    import torch
    from transformers import AutoModelForCausalLM

    name, why = resolve_dtype(spec)
    log.info("Model dtype=%s%s", name, f" ({why})" if why else "")
    kwargs: dict[str, Any] = {"dtype": getattr(torch, name)}
    quant = spec.method.quantization
    if spec.method.type == "qlora" and quant is not None:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quant.bits == 4,
            load_in_8bit=quant.bits == 8,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype),
        )
        if torch.cuda.is_available():
            # Quantized on this process's own GPU (each rank of a DDP run holds the 4-bit model).
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = _from_pretrained(AutoModelForCausalLM, source, spec.model.trust_remote_code, **kwargs)
    if spec.method.type == "qlora":
        keep_4bit_layers_trainable(model)
    return model


def load_unquantized(spec: FineTuneJobSpec, source: ModelSource) -> Any:
    """The base model never quantized, in the precision it trained and was evaluated in: what an
    adapter is merged into."""
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(spec)
    return _from_pretrained(AutoModelForCausalLM, source, spec.model.trust_remote_code, dtype=dtype)


def keep_4bit_layers_trainable(model: Any) -> int:
    """Stops bitsandbytes from repacking 4-bit weights into its CPU inference-only layout.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks every Linear4bit on the first no-grad
    forward (an evaluation pass); training after that silently gets wrong gradients. Returns the
    number of layers changed.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def apply_method(model: Any, spec: FineTuneJobSpec, source: ModelSource) -> Any:
    """Wraps the model in the PEFT method (or leaves every weight trainable for full)."""
    method = spec.method
    if method.type not in ADAPTER_METHODS:  # full fine-tuning
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    import peft

    gc = bool(spec.hyperparameters.gradient_checkpointing)
    if method.type == "qlora":
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=NON_REENTRANT
        )
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)
        model.enable_input_require_grads()
    config: Any
    if method.type in LORA_METHODS:
        lora = method.lora
        assert lora is not None, "resolve_spec fills lora settings"
        config = peft.LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules or "all-linear",
            use_dora=method.type == "dora",
            task_type=peft.TaskType.CAUSAL_LM,
        )
    elif method.type == "ia3":
        config = peft.IA3Config(task_type=peft.TaskType.CAUSAL_LM)
    elif method.type == "prefix":
        config = peft.PrefixTuningConfig(
            num_virtual_tokens=method.virtual_tokens, task_type=peft.TaskType.CAUSAL_LM
        )
    else:
        init = peft.PromptTuningInit.TEXT if method.prompt_init else peft.PromptTuningInit.RANDOM
        config = peft.PromptTuningConfig(
            num_virtual_tokens=method.virtual_tokens,
            prompt_tuning_init=init,
            prompt_tuning_init_text=method.prompt_init,
            tokenizer_name_or_path=source.path if method.prompt_init else None,
            task_type=peft.TaskType.CAUSAL_LM,
        )
    try:
        model = peft.get_peft_model(model, config)
    except ValueError as exc:
        raise SpecError(
            f"spec.method: {method.type} cannot be applied to this model: {exc}"
        ) from exc
    if method.type == "qlora":
        keep_4bit_layers_trainable(model)
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
