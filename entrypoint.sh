#!/usr/bin/env bash
# Entry point of the brats-cls image: maps each BraTS platform's call onto the brats-cls CLI, runs it as
# an unprivileged user whoever starts the container, and gives each platform the exit status it expects.
# Runs the same outside the image: INPUT_DIR=cases OUTPUT_DIR=out ./entrypoint.sh
#
# Environment:
#   INPUT_DIR (/input), OUTPUT_DIR (/output)  folders of the no-argument call (Synapse)
#   BRATS_CLS_MEDPERF (/mlcommons/volumes)    MedPerf container-config volumes, used by the no-argument
#                                             call when BRATS_CLS_MEDPERF/data exists
#   BRATS_CLS_FAILURES (/tmp/brats-cls-failures.json)
#                                             JSON list of the written, skipped and failed cases of a
#                                             segmentation call; never inside the output folder
#   BRATS_CLS (brats-cls)                     command to call; BRATS_CLS_PYTHON (python3) holds brats_cls
#   BRATS_CLS_DROP_ROOT (0; 1 in the image)   started as root, run brats-cls as the output folder's owner,
#   BRATS_CLS_RUN_AS (10001:10001)            or as BRATS_CLS_RUN_AS when root owns it (container/README.md,
#                                             "Users and file ownership")
set -euo pipefail
umask 022

usage() {
    cat <<'EOF'
usage: entrypoint.sh                      segment $INPUT_DIR (/input) into $OUTPUT_DIR (/output); when
                                          /mlcommons/volumes/data exists (MedPerf container config),
                                          segment it into /mlcommons/volumes/predictions with the
                                          optional /mlcommons/volumes/parameters/parameters_file.yaml
       entrypoint.sh infer --data_path=DIR --output_path=DIR [--parameters_file=FILE]
                                          MLCube / MedPerf / BraTS orchestrator call; FILE is YAML
                                          with any of the keys tta, cls_suppression, label_scheme,
                                          et_min_voxels, device, precision, models
       entrypoint.sh hotfix               no-op (MedPerf template)
       entrypoint.sh train|preprocess|evaluate|synth|bench|models ARGS...
                                          run `brats-cls COMMAND ARGS...`; `train --fold N` trains
                                          both networks of fold N from /data into /output
       entrypoint.sh --help               this text
Options may also be given as `--name VALUE`.
Exit status of the two segmentation calls: 0 the run completed (a case that failed is named on stderr
and in $BRATS_CLS_FAILURES, default /tmp/brats-cls-failures.json); 1 no case could be segmented;
2 usage error before any work. Other commands: brats-cls's own (0 done, 1 some work failed, 2 usage).
Started as root (no -u), the image runs brats-cls as the owner of the output folder, or as uid 10001
when root owns it, never as root.
EOF
}

self=${BASH_SOURCE[0]}
read -r -a brats_cls <<<"${BRATS_CLS:-brats-cls}"
python=${BRATS_CLS_PYTHON:-python3}
medperf=${BRATS_CLS_MEDPERF:-/mlcommons/volumes}
failures=${BRATS_CLS_FAILURES:-/tmp/brats-cls-failures.json}
run_as=${BRATS_CLS_RUN_AS:-10001:10001}
flags=()

usage_error() {
    echo "entrypoint.sh: error: $1" >&2
    usage >&2
    exit 2
}

# An error that is not about the call's syntax: the message without the usage text, exit status 2.
refuse() {
    echo "entrypoint.sh: error: $1" >&2
    exit 2
}

dropping_root() {
    [[ $(id -u) == 0 && ${BRATS_CLS_DROP_ROOT:-0} == 1 ]]
}

# Wait for the background process $1, forwarding SIGTERM and SIGINT to it (the entry point is PID 1,
# which ignores signals it has no handler for), calling "${@:2}" about once a second meanwhile; sets
# `status` to its exit status.
wait_for() {
    local child=$1
    shift
    trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
    while kill -0 "$child" 2>/dev/null; do
        (($# == 0)) || "$@" || true
        sleep 1 &
        wait $! 2>/dev/null || true  # returns early when a signal arrives
    done
    status=0
    wait "$child" || status=$?  # bash keeps the status of a reaped child
    trap - TERM INT
}

# ------------------------------------------------------------------------------ segmentation calls

# segment INPUT OUTPUT [brats-cls infer flags...]: every platform's segmentation call.
segment() {
    local input=$1 output=$2
    shift 2
    if dropping_root; then
        segment_as_root "$output"  # does not return
    fi
    output=${_BRATS_CLS_STAGING:-$output}
    writable_or_explain "$output"
    rm -f -- "$failures" 2>/dev/null || true
    "${brats_cls[@]}" infer --input "$input" --output "$output" --failures "$failures" "$@" &
    wait_for $!
    if ((status == 1)); then
        report_failures  # does not return
    fi
    exit "$status"
}

# brats-cls exited with status 1: some case failed. Name each one on stderr; exit 0 when a mask was
# written (the run completed: every platform fails the whole run on any other status), 1 when none was
# or when there is no failures file (brats-cls crashed).
report_failures() {
    local verdict=0
    "$python" - "$failures" >&2 <<'PY' || verdict=$?
import json, sys
try:
    with open(sys.argv[1]) as handle:
        record = json.load(handle)
    written, skipped, failed = record["written"], record["skipped"], record["failed"]
except (OSError, ValueError, KeyError, TypeError) as error:
    print(f"entrypoint.sh: brats-cls exited with status 1 and left no readable failures file "
          f"{sys.argv[1]} ({error}): exit status 1")
    sys.exit(1)
total = len(written) + len(skipped) + len(failed)
print(f"entrypoint.sh: {len(failed)} of {total} case(s) failed, {len(written)} written, {len(skipped)} "
      f"skipped (listed in {sys.argv[1]}):")
for case_id, message in sorted(failed.items()):
    print(f"entrypoint.sh:   {case_id}: {message}")
if written or skipped:
    print("entrypoint.sh: the run completed for the other cases: exit status 0")
    sys.exit(0)
print("entrypoint.sh: no case could be segmented: exit status 1")
sys.exit(1)
PY
    exit "$verdict"
}

# The output folder exists and this process can write there, or exit 2 saying what to change.
writable_or_explain() {
    local output=$1 owner
    [[ -d $output ]] || refuse "output folder $output does not exist: mount one there (-v HOST_FOLDER:$output)"
    [[ -w $output ]] && return 0
    owner=$(stat -c '%u:%g, mode %a' -- "$output")
    refuse "output folder $output (owner $owner) is not writable by uid $(id -u):$(id -g): run the container without -u (the image then writes as the folder's owner), or with -u set to the folder's owner"
}

# Started as root (no -u); the models never run as root. An output folder owned by a user: run the whole
# call as that user. One owned by root: run it as $run_as into a staging folder under /tmp while this
# root process moves each finished mask into the output folder (a hidden temporary name, then a rename,
# so only complete <ID>.nii.gz files ever appear there), owned by root, mode 0644.
segment_as_root() {
    local output=$1 uid gid
    [[ -d $output ]] || refuse "output folder $output does not exist: mount one there (-v HOST_FOLDER:$output)"
    read -r uid gid < <(stat -c '%u %g' -- "$output")
    if ((uid != 0)); then
        can_become "$uid" "$gid" "the owner of the output folder $output" \
            "-u $uid:$gid (the folder's owner, usually -u \$(id -u):\$(id -g))"
        exec setpriv --reuid "$uid" --regid "$gid" --clear-groups -- bash "$self" "${arguments[@]}"
    fi
    can_become "${run_as%%:*}" "${run_as#*:}" "the unprivileged user $run_as" ""
    local probe="$output/.brats-cls-write-test-$$"
    { : >"$probe"; } 2>/dev/null || refuse "output folder $output is not writable (a read-only mount?)"
    rm -f -- "$probe"
    rm -f -- "$output"/.*.nii.gz.*.tmp 2>/dev/null || true  # our own temporaries, left by a killed run
    local staging=/tmp/brats-cls-staging-$$
    as_user mkdir -m 0755 -- "$staging" 2>/dev/null ||
        refuse "cannot create $staging as uid $run_as: the image needs a writable /tmp (with --read-only, add --tmpfs /tmp)"
    echo "entrypoint.sh: root owns $output: brats-cls runs as uid $run_as into $staging, and each finished mask is moved into $output" >&2
    declare -gA published=()
    _BRATS_CLS_STAGING=$staging as_user bash "$self" "${arguments[@]}" &
    wait_for $! publish "$staging" "$output"
    publish "$staging" "$output"
    as_user rm -rf -- "$staging" || true
    exit "$status"
}

# Exit 2 naming the `docker run` flags to add, unless this root process may switch to uid $1, gid $2.
can_become() {
    local uid=$1 gid=$2 who=$3 instead=$4
    setpriv --reuid "$uid" --regid "$gid" --clear-groups -- true 2>/dev/null && return 0
    refuse "the image never runs brats-cls as root and cannot switch to $who: the container lacks the capabilities SETUID and SETGID (--cap-drop ALL?). Run it with ${instead:+$instead, or with }--cap-add SETUID --cap-add SETGID"
}

as_user() {
    setpriv --reuid "${run_as%%:*}" --regid "${run_as#*:}" --clear-groups -- "$@"
}

# Copy each mask of the staging folder that is new or rewritten into the output folder.
publish() {
    local staging=$1 output=$2 mask name stamp temporary
    for mask in "$staging"/*.nii.gz; do
        [[ -f $mask && ! -L $mask ]] || continue
        name=${mask##*/}
        stamp=$(stat -c '%Y.%s.%i' -- "$mask" 2>/dev/null) || continue
        [[ ${published[$name]:-} != "$stamp" ]] || continue
        temporary=""
        if temporary=$(mktemp --suffix=.tmp -- "$output/.$name.XXXXXXXX") && cp -- "$mask" "$temporary" &&
            chmod 0644 -- "$temporary" && sync -- "$temporary" && mv -fT -- "$temporary" "$output/$name"; then
            published[$name]=$stamp
        else
            [[ -z $temporary ]] || rm -f -- "$temporary"
            echo "entrypoint.sh: error: could not move $name into $output" >&2
        fi
    done
}

# Sets `flags` to the brats-cls flags of a parameters file (the helper names every bad key and exits 2,
# which becomes our status).
parameter_flags() {
    local text
    text=$("$python" -m brats_cls.params "$1") || exit $?
    [[ -z $text ]] || mapfile -t flags <<<"$text"
}

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
    if ((have_parameters)); then
        [[ -n $parameters_file ]] || usage_error "infer: --parameters_file is empty"
        [[ -f $parameters_file ]] || usage_error "infer: parameters file $parameters_file does not exist"
        parameter_flags "$parameters_file"
    fi
    segment "$data_path" "$output_path" "${flags[@]}"
}

# MedPerf's container config: no command, fixed volumes. The parameters file is optional, and so are the
# additional files: a weights folder (with manifest.json) there replaces the shipped weights.
medperf_infer() {
    local parameters
    for parameters in "$medperf"/parameters/parameters_file.yaml "$medperf"/parameters/parameters.yaml; do
        if [[ -f $parameters ]]; then
            parameter_flags "$parameters"
            break
        fi
    done
    if [[ -f $medperf/additional_files/manifest.json ]]; then
        flags+=(--weights "$medperf/additional_files")
    fi
    segment "$medperf/data" "$medperf/predictions" "${flags[@]}"
}

# ------------------------------------------------------------------------------ other commands

# The folder that pass-through command $1 writes into, from its arguments "${@:2}" (empty: none).
target_folder() {
    local command=$1 option="" value="" files="" word name arg
    shift
    case $command in
        train) option=--out value=${BRATS_OUTPUT:-/output} ;;
        preprocess) option=--cache ;;
        synth) option=--out ;;
        evaluate) option=--overlay files=" --csv --json --plot " ;;
        bench) files=" --json " ;;
        *) return 0 ;;
    esac
    while (($#)); do
        word=$1
        shift
        case $word in
            -h | --help) return 0 ;;
            --*=*) name=${word%%=*} arg=${word#*=} ;;
            --*) name=$word arg=${1:-} ;;
            *) continue ;;
        esac
        if [[ $name == "$option" ]]; then
            value=$arg
        elif [[ $files == *" $name "* && -z $value ]]; then
            value=$(dirname -- "$arg")
        fi
    done
    printf '%s' "$value"
}

# The nearest existing folder at or above path $1.
existing_folder() {
    local path=$1
    [[ $path == /* ]] || path=$PWD/$path
    while [[ ! -d $path ]]; do
        path=$(dirname -- "$path")
    done
    printf '%s' "$path"
}

# Started as root (no -u), a pass-through command: run it as the owner of the folder it writes into, or
# as $run_as when root owns that folder and $run_as may write there (e.g. /tmp), or when it writes none.
pass_through_as_root() {
    local command=$1 target folder="" uid gid
    target=$(target_folder "$@")
    if [[ -n $target ]]; then
        folder=$(existing_folder "$target")
        read -r uid gid < <(stat -c '%u %g' -- "$folder")
        if ((uid != 0)); then
            can_become "$uid" "$gid" "the owner of $folder" "-u $uid:$gid (the folder's owner, usually -u \$(id -u):\$(id -g))"
            exec setpriv --reuid "$uid" --regid "$gid" --clear-groups -- "${brats_cls[@]}" "$@"
        fi
    fi
    can_become "${run_as%%:*}" "${run_as#*:}" "the unprivileged user $run_as" ""
    if [[ -n $folder ]] && ! as_user test -w "$folder"; then
        refuse "$command writes into $target, and root owns $folder: the image never runs brats-cls as root. Mount a folder that you own there (Docker makes a missing bind-mount folder owned by root: create it yourself first), or run with -u set to a user who may write there"
    fi
    exec setpriv --reuid "${run_as%%:*}" --regid "${run_as#*:}" --clear-groups -- "${brats_cls[@]}" "$@"
}

# ------------------------------------------------------------------------------ dispatch

arguments=("$@")

if (($# == 0)); then
    if [[ -d $medperf/data ]]; then
        medperf_infer
    fi
    segment "${INPUT_DIR:-/input}" "${OUTPUT_DIR:-/output}"
fi

case $1 in
    infer) shift && mlcube_infer "$@" ;;
    hotfix) exit 0 ;;
    train | preprocess | evaluate | synth | bench | models)
        if dropping_root; then
            pass_through_as_root "$@"
        fi
        exec "${brats_cls[@]}" "$@" ;;
    -h | --help | help) usage ;;
    *) usage_error "unknown command '$1'" ;;
esac
