#!/usr/bin/env bash
# Entry point of the brats-cls image: maps each BraTS platform's call onto the brats-cls CLI.
# Runs the same outside the image: INPUT_DIR=cases OUTPUT_DIR=out ./entrypoint.sh
# Environment: INPUT_DIR (/input), OUTPUT_DIR (/output), BRATS_CLS (command to call, brats-cls),
# BRATS_CLS_PYTHON (interpreter holding the brats_cls package, python3).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: entrypoint.sh                      segment $INPUT_DIR (/input) into $OUTPUT_DIR (/output)
       entrypoint.sh infer --data_path=DIR --output_path=DIR [--parameters_file=FILE]
                                          MLCube / MedPerf call; FILE is YAML with any of the keys
                                          tta, cls_suppression, label_scheme, et_min_voxels,
                                          device, precision, models
       entrypoint.sh hotfix               no-op (MedPerf template)
       entrypoint.sh train|preprocess|evaluate|synth|bench|models ARGS...
                                          run `brats-cls COMMAND ARGS...`
       entrypoint.sh --help               this text
Options may also be given as `--name VALUE`. Exit status: 0 all done, 1 some case failed,
2 usage error.
EOF
}

usage_error() {
    echo "entrypoint.sh: error: $1" >&2
    usage >&2
    exit 2
}

read -r -a brats_cls <<<"${BRATS_CLS:-brats-cls}"
python=${BRATS_CLS_PYTHON:-python3}

# infer --data_path=D --output_path=O [--parameters_file=P], values after `=` or as the next word.
mlcube_infer() {
    local data_path="" output_path="" parameters_file="" have_parameters=0 name value
    while (($#)); do
        case $1 in
            --data_path=* | --output_path=* | --parameters_file=*)
                name=${1%%=*} value=${1#*=} ;;
            --data_path | --output_path | --parameters_file)
                (($# >= 2)) || usage_error "infer: $1 needs a value"
                name=$1 value=$2
                shift ;;
            *) usage_error "infer: unknown argument '$1'" ;;
        esac
        case $name in
            --data_path) data_path=$value ;;
            --output_path) output_path=$value ;;
            --parameters_file) parameters_file=$value have_parameters=1 ;;
        esac
        shift
    done
    [[ -n $data_path ]] || usage_error "infer: --data_path is required"
    [[ -n $output_path ]] || usage_error "infer: --output_path is required"
    local flags=() flag_text
    if ((have_parameters)); then
        [[ -n $parameters_file ]] || usage_error "infer: --parameters_file is empty"
        [[ -f $parameters_file ]] || usage_error "infer: parameters file $parameters_file does not exist"
        # The helper names the bad keys itself; its status (2) becomes ours.
        flag_text=$("$python" -m brats_cls.params "$parameters_file") || exit $?
        [[ -z $flag_text ]] || mapfile -t flags <<<"$flag_text"
    fi
    exec "${brats_cls[@]}" infer --input "$data_path" --output "$output_path" "${flags[@]}"
}

if (($# == 0)); then
    exec "${brats_cls[@]}" infer --input "${INPUT_DIR:-/input}" --output "${OUTPUT_DIR:-/output}"
fi

command=$1
shift
case $command in
    infer) mlcube_infer "$@" ;;
    hotfix) exit 0 ;;
    train | preprocess | evaluate | synth | bench | models) exec "${brats_cls[@]}" "$command" "$@" ;;
    -h | --help | help) usage ;;
    *) usage_error "unknown command '$command'" ;;
esac
