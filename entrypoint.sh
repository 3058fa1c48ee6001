#!/usr/bin/env bash
# Entry point of the brats-cls image: maps each BraTS platform's call (`--help` lists them) onto
# `python -m brats_cls.container segment` (exit status, failure summary, staging and publishing of masks:
# src/brats_cls/container.py) or `brats-cls`, and started as root runs that as an unprivileged user
# (container/README.md, "Users and file ownership"). Outside the image: INPUT_DIR=in OUTPUT_DIR=out ./entrypoint.sh
# Environment: INPUT_DIR, OUTPUT_DIR, BRATS_CLS_MEDPERF (/mlcommons/volumes), BRATS_CLS (brats-cls),
# BRATS_CLS_PYTHON (python3), BRATS_CLS_DROP_ROOT (0; 1 in the image), BRATS_CLS_RUN_AS (10001:10001);
# brats_cls.container reads BRATS_CLS_FAILURES, BRATS_CLS_SHARD and BRATS_CLS_DEVICES (`--help`).
set -euo pipefail
umask 022
read -r -a brats_cls <<<"${BRATS_CLS:-brats-cls}"
container=("${BRATS_CLS_PYTHON:-python3}" -m brats_cls.container)
medperf=${BRATS_CLS_MEDPERF:-/mlcommons/volumes}
run_as=${BRATS_CLS_RUN_AS:-10001:10001}
user=() owner=0

fail() { echo "entrypoint.sh: error: $1" >&2; exit 2; }
usage_error() { echo "entrypoint.sh: error: $1" >&2; "${container[@]}" usage >&2; exit 2; }
dropping_root() { [[ $(id -u) == 0 && ${BRATS_CLS_DROP_ROOT:-0} == 1 ]]; }

# Started as root in the image, set `user` to the setpriv call that runs a command as the owner of folder
# $1 (`owner`: its uid), or as $run_as when root owns it or it does not exist; exit 2 naming the
# `docker run` flags to add when the container may not switch users. Otherwise `user` stays empty.
drop_root() {
    dropping_root || return 0
    local uid=${run_as%%:*} gid=${run_as#*:} who="the unprivileged user $run_as" instead="" group
    [[ -z $1 ]] || read -r owner group < <(stat -c '%u %g' -- "$1" 2>/dev/null || echo 0 0)
    ((owner == 0)) || uid=$owner gid=$group who="the owner of $1" instead="-u $owner:$group (the folder's owner, usually -u \$(id -u):\$(id -g)), or with "
    user=(setpriv --reuid "$uid" --regid "$gid" --clear-groups --)
    "${user[@]}" true 2>/dev/null || fail "the image never runs brats-cls as root and cannot switch to $who: the container lacks the capabilities SETUID and SETGID (--cap-drop ALL?). Run it with $instead--cap-add SETUID --cap-add SETGID"
}

# segment INPUT OUTPUT [segment options]. Into a root-owned folder, brats-cls runs as $run_as into a
# staging folder while a root process publishes each finished mask.
segment() {
    local call=("${container[@]}" segment --input "$1" --output "$2" "${@:3}") staging=/tmp/brats-cls-staging-$$
    drop_root "$2"
    if ((${#user[@]} && owner == 0)) && [[ -d $2 ]]; then
        echo "entrypoint.sh: root owns $2: brats-cls runs as uid $run_as into $staging, and each finished mask is moved into $2" >&2
        exec "${container[@]}" publish "$2" "$staging" -- "${user[@]}" "${call[@]}" --staging "$staging"
    fi
    exec "${user[@]}" "${call[@]}"
}

# infer --data_path=D --output_path=O [--parameters_file=P] (MLCube, the orchestrator); `--name value` too.
mlcube_infer() {
    local name && local -A given=()
    while (($#)); do
        case $1 in
            --data_path | --output_path | --parameters_file)
                (($# >= 2)) || usage_error "infer: $1 needs a value"
                set -- "$1=$2" "${@:3}" ;;
            --data_path=* | --output_path=* | --parameters_file=*) given[${1%%=*}]=${1#*=} && shift ;;
            *) usage_error "infer: unknown argument '$1'" ;;
        esac
    done
    for name in --data_path --output_path; do [[ -n ${given[$name]:-} ]] || usage_error "infer: $name is required"; done
    [[ ! -v given[--parameters_file] || -f ${given[--parameters_file]} ]] ||
        usage_error "infer: parameters file ${given[--parameters_file]} does not exist"
    segment "${given[--data_path]}" "${given[--output_path]}" ${given[--parameters_file]+--parameters "${given[--parameters_file]}"}
}

# MedPerf's container config: fixed volumes; a parameters file and a weights folder (additional files) optional.
medperf_infer() {
    local options=() parameters
    for parameters in "$medperf"/parameters/parameters_file.yaml "$medperf"/parameters/parameters.yaml; do
        [[ ! -f $parameters ]] || { options+=(--parameters "$parameters") && break; }
    done
    [[ ! -f $medperf/additional_files/manifest.json ]] || options+=(--weights "$medperf/additional_files")
    segment "$medperf/data" "$medperf/predictions" "${options[@]}"
}

# Another command, as the owner of the folder it writes into (`writes-into` names it: the nearest existing
# one), or as $run_as when it writes none, or root owns that folder and $run_as may write there.
pass_through() {
    local folder=""
    ! dropping_root || folder=$("${container[@]}" writes-into "$@")
    drop_root "$folder"
    if ((${#user[@]} && owner == 0)) && [[ -n $folder ]] && ! "${user[@]}" test -w "$folder"; then
        fail "root owns $folder, which $1 writes into: the image never runs brats-cls as root. Mount a folder that you own there (Docker makes a missing bind-mount folder owned by root: create it yourself first), or run with -u set to a user who may write there"
    fi
    exec "${user[@]}" "${brats_cls[@]}" "$@"
}

if (($# == 0)); then
    [[ ! -d $medperf/data ]] || medperf_infer
    segment "${INPUT_DIR:-/input}" "${OUTPUT_DIR:-/output}"
fi
case $1 in
    infer) shift && mlcube_infer "$@" ;;
    hotfix) exit 0 ;;
    train | preprocess | evaluate | synth | bench | models) pass_through "$@" ;;
    -h | --help | help) exec "${container[@]}" usage ;;
    *) usage_error "unknown command '$1'" ;;
esac
