#!/bin/bash
# Precompute without a Ray cluster: split one input into chunks, build (or embed) every chunk
# as a task of a SLURM array job, and merge the pieces in a job that starts when every task
# has succeeded (sbatch --dependency=afterok). Run it where you run sbatch (slurm/ARRAY.md).
#
#   slurm/precompute.sh [options] library INPUT OUTPUT [biogen library build options]
#   slurm/precompute.sh [options] embed INPUT OUTPUT [biogen embed options]
#
#   slurm/precompute.sh --tasks 50 --sbatch '--partition=cpu --time=2:00:00' library zinc.smi.gz /shared/zinc
#   slurm/precompute.sh --records 20000 --sbatch '--gpus-per-task=1' embed uniref.fa.gz /shared/emb model=esm2_t33_650M_UR50D
#
# INPUT is one file (SMILES, CSV/TSV, SDF; FASTA for embed; gzipped or not), split by records
# into OUTPUT.parts/chunks/part-000.<ext> ... (a CSV/TSV header, or a SMILES header with
# reader.smi_header=true, is repeated in every chunk), or @LIST: a file naming one input per
# line, used as the chunks as they are. OUTPUT.parts/chunks.txt lists the chunks: array task
# i gets line i + 1 and writes its piece to OUTPUT.parts/part-<i>; the merge job writes OUTPUT.
# Logs: OUTPUT.parts/logs/. Prints the job ids (and ARRAY_JOB_ID=..., MERGE_JOB_ID=... lines).
#
# Options:
#   --records N          records per chunk (default 100000 molecules, 20000 proteins)
#   --tasks N            N chunks of equal size instead (counts the records first)
#   --max-parallel M     at most M tasks running at once (sbatch --array=0-<n-1>%M)
#   --sbatch 'OPTS'      more sbatch options for the array tasks (partition, time, CPUs, GPUs)
#   --merge-sbatch 'OPTS'  more sbatch options for the merge job
#   --dry-run            split and print the sbatch commands without submitting them
#
# Run again with the same arguments after a failure: the split is reused, finished pieces are
# left as they are, unfinished ones resume from their ledgers, then the merge runs.
# BIOGEN_ENV=<script> is sourced by every job first (a venv, modules, conda).

set -euo pipefail

EX_USAGE=64
HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)

log() { printf '[biogen-precompute] %s\n' "$*" >&2; }
die() { log "ERROR: $2"; exit "$1"; }
usage() { sed -n '2,31s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

hydra_quote() {  # a value quoted for a Hydra override (paths with = , [ ] or spaces)
    local v=${1//\'/\\\'}
    printf "'%s'" "$v"
}

split_kind() {  # split_kind FILE BIOGEN_ARGS... -> lines | header | sdf | fasta
    local file=$1 name fmt="" a
    shift
    name=$(basename -- "$file")
    name=${name%.gz}
    name=${name%.GZ}
    for a in "$@"; do [[ $a == reader.format=* ]] && fmt=${a#reader.format=}; done
    [[ -n $fmt && $fmt != auto ]] || fmt=${name##*.}
    case ${fmt,,} in
        smi | smiles | ism | can)
            if printf '%s\n' "$@" | grep -qiE '^reader\.smi_header=(true|yes|1)$'; then echo header; else echo lines; fi ;;
        csv | tsv | tab | dat) echo header ;;
        sdf | sd | mol) echo sdf ;;
        fasta | fa | faa | fas | fna | fsa | pep) echo fasta ;;
        *) die "$EX_USAGE" "cannot tell how to split $file (extension .$fmt): give a .smi/.csv/.tsv/.sdf/.fasta file (.gz ok), reader.format=..., or @LIST of chunks you made" ;;
    esac
}

count_records() {  # count_records FILE KIND
    gzip -cdf -- "$1" | awk -v kind="$2" '
        kind == "lines" && /^[ \t\r]*(#|$)/ { next }  # blank lines, comments
        kind == "header" && /^[ \t\r]*$/ { next }
        kind == "lines" { n++ } kind == "header" && NR > 1 { n++ }
        kind == "sdf" && /^\$\$\$\$[ \t\r]*$/ { n++ } kind == "fasta" && /^>/ { n++ }
        END { print n + 0 }'
}

split_input() {  # split_input FILE KIND PER DIR EXT -> chunk paths, one a line, in order
    gzip -cdf -- "$1" | awk -v kind="$2" -v per="$3" -v dir="$4" -v ext="$5" '
        function next_chunk() {
            if (out != "") close(out)
            out = sprintf("%s/part-%03d.%s", dir, part++, ext)
            print out
            n = 0
            if (kind == "header") print header > out
        }
        BEGIN { part = 0; n = 0; out = ""; start = 1 }
        kind == "header" && NR == 1 { header = $0; next }
        # a blank or comment line is no record: it never opens a chunk (a chunk of only blank
        # lines would fail its task, and with it the merge)
        (kind == "lines" && /^[ \t\r]*(#|$)/) || (kind == "header" && NR > 1 && /^[ \t\r]*$/) {
            if (out != "") print > out
            next
        }
        kind == "lines" || kind == "header" { if (out == "" || n == per) next_chunk(); print > out; n++; next }
        kind == "sdf" {
            if (start && /^[ \t\r]*$/) { if (out != "") print > out; next }
            if (start) { if (out == "" || n == per) next_chunk(); start = 0 }
            print > out
            if ($0 ~ /^\$\$\$\$[ \t\r]*$/) { n++; start = 1 }
            next
        }
        kind == "fasta" {
            if (/^>/) { if (out == "" || n == per) next_chunk(); n++ }
            else if (out == "") next_chunk()
            print > out
        }
        END { if (out != "") close(out) }'
}

main() {
    local records="" tasks="" max_par="" sbatch_opts="" merge_opts="" dry=0
    while (($#)); do
        case $1 in
            --records) records=${2:?}; shift 2 ;;
            --tasks) tasks=${2:?}; shift 2 ;;
            --max-parallel) max_par=${2:?}; shift 2 ;;
            --sbatch) sbatch_opts=${2?}; shift 2 ;;
            --merge-sbatch) merge_opts=${2?}; shift 2 ;;
            --dry-run) dry=1; shift ;;
            -h | --help) usage; exit 0 ;;
            --) shift; break ;;
            -*) die "$EX_USAGE" "unknown option $1 (see --help)" ;;
            *) break ;;
        esac
    done
    (($# >= 3)) || { usage >&2; exit "$EX_USAGE"; }
    local kind=$1 input=$2 output
    output=$(realpath -m -- "$3")
    shift 3
    local script default_per
    local -a merge_job
    case $kind in
        library) script=$HERE/array_build.sbatch; merge_job=(library merge runtime.progress=false); default_per=100000 ;;
        embed) script=$HERE/array_embed.sbatch; merge_job=(embed merge progress=false); default_per=20000 ;;
        *) die "$EX_USAGE" "the job is 'library' or 'embed', not '$kind' (see --help)" ;;
    esac
    [[ -z $records || $records =~ ^[1-9][0-9]*$ ]] || die "$EX_USAGE" "--records $records: give a positive number"
    [[ -z $tasks || $tasks =~ ^[1-9][0-9]*$ ]] || die "$EX_USAGE" "--tasks $tasks: give a positive number"
    [[ -z $max_par || $max_par =~ ^[1-9][0-9]*$ ]] || die "$EX_USAGE" "--max-parallel $max_par: give a positive number"
    [[ -z $records || -z $tasks ]] || die "$EX_USAGE" "give --records or --tasks, not both"
    ((dry)) || command -v sbatch >/dev/null || die "$EX_USAGE" "no sbatch on PATH: run this where SLURM jobs are submitted"

    local parts=$output.parts list
    list=$parts/chunks.txt
    mkdir -p -- "$parts/chunks" "$parts/logs"
    if [[ $input == @* ]]; then  # the user's own chunks
        local src=${input#@} line src_dir
        [[ -r $src ]] || die "$EX_USAGE" "list $src not found"
        src_dir=$(cd -- "$(dirname -- "$src")" && pwd)
        : >"$list.tmp"
        while IFS= read -r line || [[ -n $line ]]; do
            line=${line%$'\r'}
            [[ -n $line ]] || continue
            [[ $line == /* ]] || line=$src_dir/$line
            [[ -r $line ]] || die "$EX_USAGE" "$src names $line, which is not a readable file"
            printf '%s\n' "$line" >>"$list.tmp"
        done <"$src"
        mv -- "$list.tmp" "$list"
    else
        [[ -r $input ]] || die "$EX_USAGE" "input $input not found or not readable"
        local how ext stamp per
        how=$(split_kind "$input" "$@")
        ext=$(basename -- "$input")
        ext=${ext%.gz}
        ext=${ext##*.}
        if [[ -n $tasks ]]; then
            local total
            total=$(count_records "$input" "$how")
            ((total > 0)) || die "$EX_USAGE" "no records in $input"
            per=$(((total + tasks - 1) / tasks))
        else
            per=${records:-$default_per}
        fi
        stamp="$(realpath -- "$input") $(stat -c '%s %Y' -- "$input") $how $per"
        if [[ -s $list && -f $parts/chunks/.source && $(<"$parts/chunks/.source") == "$stamp" ]]; then
            log "reusing the split of $input in $parts/chunks ($(wc -l <"$list") chunks)"
        else
            if compgen -G "$parts/part-*" >/dev/null; then
                die "$EX_USAGE" "$parts holds pieces of another split (input, size or chunk size changed); remove $parts or choose another OUTPUT"
            fi
            rm -f -- "$parts"/chunks/part-* "$parts/chunks/.source" "$list"
            log "splitting $input into chunks of $per records ($how) in $parts/chunks"
            split_input "$input" "$how" "$per" "$parts/chunks" "$ext" >"$list.tmp"
            mv -- "$list.tmp" "$list"
            printf '%s' "$stamp" >"$parts/chunks/.source"
        fi
    fi
    local n
    n=$(grep -c . "$list" || true)
    ((n > 0)) || die "$EX_USAGE" "no chunks to run (empty $list)"

    # shellcheck disable=SC2206  # the user's sbatch options, split on spaces on purpose
    local -a user_opts=($sbatch_opts) user_merge=($merge_opts)
    local -a array_cmd=(sbatch --parsable "--array=0-$((n - 1))${max_par:+%$max_par}" "--job-name=biogen-$kind"
        "--output=$parts/logs/slurm-%A_%a.out" "${user_opts[@]}" "$script" "$list" "$parts" "$@")
    local -a merge_cmd=(biogen "${merge_job[@]}" "parts=$(hydra_quote "$parts/part-*")" "output=$(hydra_quote "$output")")
    local merge_script
    merge_script=$(cat <<EOF
#!/bin/bash
# the merge step of slurm/precompute.sh: runs when every array task has succeeded
if [[ -n \${BIOGEN_ENV:-} ]]; then source "\$BIOGEN_ENV" || exit 64; fi
set -uo pipefail
echo "[biogen-merge \$(date '+%F %T')] running: $(printf '%q ' "${merge_cmd[@]}")"
$(printf '%q ' "${merge_cmd[@]}") </dev/null
status=\$?
echo "[biogen-merge \$(date '+%F %T')] exit status \$status"
exit \$status
EOF
)
    if ((dry)); then
        printf '%q ' "${array_cmd[@]}"; echo
        echo "sbatch --parsable --dependency=afterok:<array job id> --kill-on-invalid-dep=yes --job-name=biogen-merge --output=$parts/logs/merge-%j.out ${merge_opts} <<'EOF'"
        printf '%s\nEOF\n' "$merge_script"
        exit 0
    fi
    local array_id merge_id
    array_id=$("${array_cmd[@]}")
    array_id=${array_id%%;*}
    merge_id=$(sbatch --parsable "--dependency=afterok:$array_id" --kill-on-invalid-dep=yes --job-name=biogen-merge \
        "--output=$parts/logs/merge-%j.out" "${user_merge[@]}" <<<"$merge_script")
    merge_id=${merge_id%%;*}
    log "array job $array_id: $n tasks, $kind of $list into $parts/part-<task> (logs $parts/logs/slurm-${array_id}_<task>.out)"
    log "merge job $merge_id: starts when every task of $array_id has succeeded, writes $output (log $parts/logs/merge-$merge_id.out)"
    log "if a task fails, SLURM cancels the merge job: fix the cause and run this command again (finished pieces"
    log "are kept, unfinished ones resume), or resubmit the task alone and merge when it is done:"
    log "  sbatch --array=<task> $(printf '%q ' "${array_cmd[@]:3}")"
    log "  $(printf '%q ' "${merge_cmd[@]}")"
    echo "ARRAY_JOB_ID=$array_id"
    echo "MERGE_JOB_ID=$merge_id"
}

main "$@"
