"""``cifarlab export CHECKPOINT --format onnx``: an ONNX model with the normalization inside."""
from __future__ import annotations

from .args import bounded_int


def register(sub) -> None:
    from ..export import DEFAULT_OPSET

    p = sub.add_parser("export", help="export a checkpoint to ONNX (normalization included)",
                       description="Export to ONNX. Input 'pixels': float32 (N, C, H, W) of the checkpoint's image "
                                   "shape, RGB, raw 0..255 (the checkpoint's normalization is inside the graph); "
                                   "outputs 'logits' and 'probabilities'; class names in the metadata "
                                   "'cifarlab.classes'.")
    p.add_argument("checkpoint", help="a run folder, a checkpoint folder or a .safetensors file")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="output format (default: onnx)")
    p.add_argument("--out", help="output file, or a folder to put it in (missing folders are created; default: "
                                 "model.onnx in the run folder, or beside the file; never inside a checkpoint or "
                                 "at a name the run folder keeps for itself, such as final/)")
    p.add_argument("--opset", type=bounded_int(13, 20), default=DEFAULT_OPSET,
                   help=f"ONNX opset version (default: {DEFAULT_OPSET})")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check against PyTorch")
    p.add_argument("--force", action="store_true", help="replace an existing file at --out (never a checkpoint's "
                                                        "files, never inside a checkpoint folder)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoints import load_checkpoint
    from ..export import INPUT_NAME, export_onnx, input_shape, output_path

    ckpt = load_checkpoint(args.checkpoint)
    out = output_path(args.checkpoint, args.out)
    report = export_onnx(ckpt, out, opset=args.opset, verify=not args.no_verify, overwrite=args.force)
    verified = report.get("verified")
    shape = ", ".join(map(str, input_shape(ckpt)))
    print(f"wrote {out} ({report['bytes'] / 1e6:.1f} MB, ONNX opset {report['opset']}); input '{INPUT_NAME}' "
          f"float32 (N, {shape}) RGB 0..255, outputs 'logits' and 'probabilities'")
    if verified:
        print(f"checked in onnxruntime against PyTorch on {verified['images']} images: max |logit diff| "
              f"{verified['max_abs_logit_diff']:.2g}, same predictions: {verified['same_predictions']}")
    return 0
