"""Image generators: Stable Diffusion pipelines from diffusers, with the same three weight
sources as the reward models (configs in `generators/`).

    create_pipeline("sd-2-1")                    released weights (hub online, HF cache offline)
    create_pipeline("sd-2-1", weights="/models") a local diffusers folder
    create_pipeline("sd-2-1", weights="random")  SD 2.1's architecture with random weights
    create_pipeline("tiny-sd")                   a tiny twin: the same classes, a small config

Random-weight pipelines are composed from their components (UNet, VAE, CLIP text encoder, the
CLIP BPE tokenizer, the scheduler) exactly as diffusers composes a loaded one. LoRA adapters
are saved (`save_adapter`) and loaded (`apply_lora`) here, in diffusers' format; training them
uses `tia2.models.diffusion_training`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from tia2.errors import UserError
from tia2.models import ConfigRegistry
from tia2.seeding import seeded_init

GENERATORS = ConfigRegistry(Path(__file__).parent / "generators", "generator")
list_generators = GENERATORS.names
generator_config = GENERATORS.config


@dataclass
class Generator:
    name: str
    identity: str      # "<hub repo>@sha256:<12 hex of the UNet weights>" or "random-init:<seed>"
    pipeline: object   # diffusers.StableDiffusionPipeline
    lora: str | None = None  # "<file name>@sha256:<12 hex>" of an applied LoRA adapter


# A LoRA adapter's file in diffusers' format: what fine-tuning saves and generation loads.
ADAPTER_FILE = "pytorch_lora_weights.safetensors"


def save_adapter(unet, folder: Path) -> Path:
    """The UNet's LoRA adapter (peft's) in diffusers' format, the file `apply_lora` loads."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    return folder / ADAPTER_FILE


def apply_lora(generator: Generator, path: str | Path) -> Generator:
    """Load a LoRA adapter (diffusers' `ADAPTER_FILE`, the file or its folder), as the
    fine-tuning stage saves it (`save_adapter`), into the generator's UNet."""
    from tia2.models.base import weights_identity

    path = Path(path)
    file = path / ADAPTER_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no LoRA adapter at {file} (expected {ADAPTER_FILE})")
    try:
        with seeded_init(0):  # the LoRA layers' initial weights, overwritten by the file's
            generator.pipeline.load_lora_weights(str(file.parent), weight_name=file.name)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{file}: not a LoRA adapter for {generator.name}: {str(exc).splitlines()[0]}") from exc
    generator.lora = weights_identity(file.name, file)
    return generator


# diffusers and transformers resolve their names lazily, and two threads doing it at once (prompt
# shards mapped by a thread-pool task runner) can see a half-initialised module.
_LAZY_IMPORT = threading.Lock()
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def create_pipeline(name: str, weights: str = "pretrained", seed: int = 0, device: str = "cpu",
                    dtype: str = "fp32", channels_last: bool = False, compile_unet: bool = False) -> Generator:
    """Build a generator. GPU options: half precision (`dtype` fp16/bf16), the UNet in
    channels-last memory format, and `torch.compile` of the UNet. Attention uses PyTorch's
    scaled-dot-product kernel (diffusers' default with torch 2)."""
    import torch

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (use {', '.join(DTYPES)})")
    if dtype != "fp32" and not str(device).startswith("cuda"):
        raise UserError(f"--dtype {dtype} needs a GPU (--device cuda)")
    config = generator_config(name)
    weights = GENERATORS.weights_source(name, config["hf_repo"] is not None, weights)
    with seeded_init(seed):
        pipeline, identity = _build_pipeline(name, config, weights, seed)
    pipeline.set_progress_bar_config(disable=True)
    pipeline = pipeline.to(device) if dtype == "fp32" else pipeline.to(device, getattr(torch, DTYPES[dtype]))
    if channels_last:
        pipeline.unet.to(memory_format=torch.channels_last)
    if compile_unet:
        pipeline.unet = torch.compile(pipeline.unet)
    return Generator(name=name, identity=identity, pipeline=pipeline)


def _build_pipeline(name: str, config: dict, weights: str, seed: int):
    """The pipeline on the CPU in fp32 and its identity: composed from random-weight components,
    or loaded from a diffusers folder."""
    import torch

    with _LAZY_IMPORT:
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

    from tia2.models.base import folder_weights_file, resolve_weights_folder, weights_identity
    from tia2.models.clip_family import clip_bpe_tokenizer

    if weights == "random":
        scheduler_config = {k: v for k, v in config["scheduler"].items() if not k.startswith("_")}
        pipeline = StableDiffusionPipeline(
            vae=AutoencoderKL(**config["vae"]), text_encoder=CLIPTextModel(CLIPTextConfig(**config["text_encoder"])),
            tokenizer=clip_bpe_tokenizer(), unet=UNet2DConditionModel(**config["unet"]),
            scheduler=DDIMScheduler(**scheduler_config), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        return pipeline, f"random-init:{seed}"
    released = {"hf_repo": config["hf_repo"],
                "files": ["*.json", "*.txt", "unet/*.safetensors", "vae/*.safetensors", "text_encoder/*.safetensors"]}
    folder = resolve_weights_folder(name, released, weights) if weights == "pretrained" else Path(weights)
    if not (folder / "model_index.json").is_file():
        raise UserError(f"{name}: {folder} is not a diffusers pipeline folder (no model_index.json)")
    pipeline = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False)
    return pipeline, weights_identity(config["hf_repo"], folder_weights_file(folder / "unet"))
