#!/usr/bin/env bash
# Issue 21's results: Fashion-MNIST with 1% of the train labels (600 images, 60 per class).
# Per objective, at the budget of its quick preset (same batch, same optimizer steps):
#   SSL alone, then k-NN / linear probe / fine-tune on the 1%;
#   [SSL, supervised] with 16 labelled images in every batch of 128, then the same evaluation;
#   supervised alone on the 1% (every batch labelled), then the same evaluation;
# next to the backbone untrained and raw pixels, evaluated on the same 1%. The whole 10k test split.
#
#   bash scripts/few_labels_fmnist.sh [row ...]     # default: every row; runs/few_labels/<row>/
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
    local methods=methods=[knn,linear,finetune]
    [[ " $* " == *" pixels=true "* ]] && methods=methods=[knn,linear]  # nothing to fine-tune
    [ -f "$OUT/$name.label_efficiency.json" ] && return 0
    echo "== evaluate $name: $*"
    /usr/bin/time -f "$name eval wall %e s" python -m ssl.eval.label_efficiency "$@" "$methods" "${EVAL[@]}" \
        output="$OUT/$name.label_efficiency.json" > "$OUT/$name.eval.log" 2>&1
    tail -n 1 "$OUT/$name.eval.log"
}

row() {
    case $1 in
        pixels)        evaluate pixels pixels=true dataset=fashion_mnist ;;
        # the quick presets' two backbones: ViT-T/7 depth 6 (DINO, MAE) and ResNet-18 (CoKe)
        vit_untrained) evaluate vit_untrained backbone=vit_t dataset=fashion_mnist dataset.patch_size=7 \
                           +backbone.kwargs.depth=6 ;;
        resnet18_untrained) evaluate resnet18_untrained backbone=resnet18 dataset=fashion_mnist ;;

        # DINO: 1 epoch x 468 steps of 128
        dino)          pretrain dino experiment=quickstart
                       evaluate dino checkpoint="$OUT/dino/backbone.safetensors" dataset=fashion_mnist ;;
        dino_sup)      pretrain dino_sup experiment=quickstart "objective=[dino,supervised]" "${FEW[@]}" \
                           data.labelled_per_batch=16 trainer.limit_train_batches=468
                       evaluate dino_sup checkpoint="$OUT/dino_sup/backbone.safetensors" dataset=fashion_mnist ;;
        # every batch labelled: 4 batches of 128 per pass over the 600, 117 passes = 468 steps
        sup_vit)       pretrain sup_vit experiment=quickstart objective=supervised "~objective.dino" "${FEW[@]}" \
                           data.labelled_per_batch=128 trainer.max_epochs=117 optimizer.warmup_epochs=23 \
                           knn.every_n_epochs=117
                       evaluate sup_vit checkpoint="$OUT/sup_vit/backbone.safetensors" dataset=fashion_mnist ;;

        # MAE: 3 epochs x 468 steps
        mae)           pretrain mae experiment=quickstart_mae
                       evaluate mae checkpoint="$OUT/mae/backbone.safetensors" dataset=fashion_mnist ;;
        mae_sup)       pretrain mae_sup experiment=quickstart_mae "objective=[mae,supervised]" "${FEW[@]}" \
                           data.labelled_per_batch=16 trainer.limit_train_batches=468
                       evaluate mae_sup checkpoint="$OUT/mae_sup/backbone.safetensors" dataset=fashion_mnist ;;
        sup_vit_mae)   pretrain sup_vit_mae experiment=quickstart_mae objective=supervised "${FEW[@]}" \
                           data.labelled_per_batch=128 trainer.max_epochs=351 optimizer.warmup_epochs=70 \
                           knn.every_n_epochs=351
                       evaluate sup_vit_mae checkpoint="$OUT/sup_vit_mae/backbone.safetensors" dataset=fashion_mnist ;;

        # CoKe: 6 epochs x 100 steps, ResNet-18
        coke)          pretrain coke experiment=quickstart_coke
                       evaluate coke checkpoint="$OUT/coke/backbone.safetensors" dataset=fashion_mnist ;;
        coke_sup)      pretrain coke_sup experiment=quickstart_coke "objective=[coke,supervised]" "${FEW[@]}" \
                           data.labelled_per_batch=16
                       evaluate coke_sup checkpoint="$OUT/coke_sup/backbone.safetensors" dataset=fashion_mnist ;;
        sup_resnet18)  pretrain sup_resnet18 experiment=quickstart_coke objective=supervised "${FEW[@]}" \
                           data.labelled_per_batch=128 trainer.max_epochs=150 trainer.limit_train_batches=null \
                           optimizer.warmup_epochs=25 knn.every_n_epochs=150
                       evaluate sup_resnet18 checkpoint="$OUT/sup_resnet18/backbone.safetensors" dataset=fashion_mnist ;;
        *) echo "unknown row $1" >&2; exit 2 ;;
    esac
}

ROWS=("$@")
[ ${#ROWS[@]} -eq 0 ] && ROWS=(pixels vit_untrained dino dino_sup sup_vit resnet18_untrained coke coke_sup \
                               sup_resnet18 mae mae_sup sup_vit_mae)
for r in "${ROWS[@]}"; do row "$r"; done
