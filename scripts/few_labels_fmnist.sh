#!/usr/bin/env bash
# Issue 21's results: Fashion-MNIST with 1% of the train labels (600 images, 60 per class).
# Per objective, at the budget of its quick preset (same batch, same optimizer steps):
#   SSL alone, then k-NN / linear probe / fine-tune on the 1%;
#   [SSL, supervised] with 16 labelled images in every batch of 128, then the same evaluation;
#   supervised alone on the 1% (every batch labelled), then the same evaluation;
# next to the backbone untrained and raw pixels, evaluated on the same 1%. The whole 10k test split.
#
#   bash scripts/few_labels_fmnist.sh [row ...]     # default: every row; runs/few_labels/<row>/
#   METHODS=knn,linear bash scripts/few_labels_fmnist.sh ...   # skip fine-tuning (~7 of a row's ~11 eval min)
#
# A finished row (its label_efficiency.json exists) is skipped, so the script can be re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/few_labels
mkdir -p "$OUT"
EVAL=(fractions=[0.01] seed=0)
FEW=(dataset.labelled_fraction=0.01 seed=0)

pretrain() {  # name, overrides...
    local name=$1; shift
    [ -f "$OUT/$name/backbone.safetensors" ] && return 0
    echo "== pretrain $name: $*"
    /usr/bin/time -f "$name pretrain wall %e s" python -m ssl.pretrain "$@" hydra.run.dir="$OUT/$name" \
        > "$OUT/$name.pretrain.log" 2>&1
    tail -n 1 "$OUT/$name.pretrain.log"
}

evaluate() {  # name, overrides... (a checkpoint, or a baseline's backbone= / pixels=)
    local name=$1; shift
    local methods="methods=[${METHODS:-knn,linear,finetune}]"
    [[ " $* " == *" pixels=true "* ]] && methods=methods=[knn,linear]  # nothing to fine-tune
    [ -f "$OUT/$name.label_efficiency.json" ] && return 0
    echo "== evaluate $name: $*"
    /usr/bin/time -f "$name eval wall %e s" python -m ssl.eval.label_efficiency "$@" "$methods" "${EVAL[@]}" \
        output="$OUT/$name.label_efficiency.json" > "$OUT/$name.eval.log" 2>&1
    tail -n 1 "$OUT/$name.eval.log"
}

trained() {  # name, pretrain overrides...: pretrain, then evaluate the exported backbone
    local name=$1; shift
    pretrain "$name" "$@"
    evaluate "$name" checkpoint="$OUT/$name/backbone.safetensors" dataset=fashion_mnist
}

mixed() {  # name, preset, objective: [objective,supervised] with LABELLED (16) labelled images per batch of 128
    trained "$1" experiment="$2" "objective=[$3,supervised]" "${FEW[@]}" data.labelled_per_batch="${LABELLED:-16}" \
        "${@:4}"
}

supervised_alone() {  # name, preset, passes over the 600 (4 batches of 128 each)
    # the preset's settings of its own objective are dropped by ssl.pretrain (it says so)
    trained "$1" experiment="$2" objective=supervised "${FEW[@]}" data.labelled_per_batch=128 \
        trainer.max_epochs="$3" optimizer.warmup_epochs=$(($3 / 5)) knn.every_n_epochs="$3" "${@:4}"
}

row() {
    case $1 in
        pixels)        evaluate pixels pixels=true dataset=fashion_mnist ;;
        # the quick presets' two backbones: ViT-T/7 depth 6 (DINO, MAE) and ResNet-18 (CoKe)
        vit_untrained) evaluate vit_untrained backbone=vit_t dataset=fashion_mnist dataset.patch_size=7 \
                           +backbone.kwargs.depth=6 ;;
        resnet18_untrained) evaluate resnet18_untrained backbone=resnet18 dataset=fashion_mnist ;;
        # DINO: 1 epoch x 468 steps of 128 (117 passes x 4 batches alone)
        dino)          trained dino experiment=quickstart ;;
        dino_sup)      mixed dino_sup quickstart dino trainer.limit_train_batches=468 ;;
        dino_sup64)    LABELLED=64 mixed dino_sup64 quickstart dino trainer.limit_train_batches=468 ;;
        sup_vit)       supervised_alone sup_vit quickstart 117 ;;
        # MAE: 3 epochs x 468 steps
        mae)           trained mae experiment=quickstart_mae ;;
        mae_sup)       mixed mae_sup quickstart_mae mae trainer.limit_train_batches=468 ;;
        sup_vit_mae)   supervised_alone sup_vit_mae quickstart_mae 351 ;;
        # CoKe: 6 epochs x 100 steps, ResNet-18
        coke)          trained coke experiment=quickstart_coke ;;
        coke_sup)      mixed coke_sup quickstart_coke coke ;;
        sup_resnet18)  supervised_alone sup_resnet18 quickstart_coke 150 trainer.limit_train_batches=null ;;
        *) echo "unknown row $1" >&2; exit 2 ;;
    esac
}

ROWS=("$@")
[ ${#ROWS[@]} -eq 0 ] && ROWS=(pixels vit_untrained dino dino_sup sup_vit resnet18_untrained coke coke_sup \
                               sup_resnet18 mae mae_sup sup_vit_mae)
for r in "${ROWS[@]}"; do row "$r"; done
