#!/bin/bash
# usage: batch.sh BIN LABEL -- the 600 seeded mutants through check/extract/verify/run in one invocation each
BIN=$1; L=$2; export HOME=/tmp/ioread8/home-$L; K=/tmp/ioread8/keys-$L; O=/tmp/ioread8/batch-$L; rm -rf $O; mkdir -p $O
cd /tmp/ioread8/mut
for cmd in check extract verify run; do
  case $cmd in
    check|extract) a="$cmd --json";; verify) a="verify --json --keys $K";; run) a="run --json --out $O/run";;
  esac
  ( timeout 600 /usr/bin/time -f "MAXRSS_KB=%M" $BIN $a m* >$O/$cmd.out 2>$O/$cmd.err ); rc=$?
  rss=$(grep -o 'MAXRSS_KB=[0-9]*' $O/$cmd.err | cut -d= -f2)
  printf "%-8s rc=%s rss=%sMB rows=%s error_rows=%s stderr_lines=%s tracebacks=%s pydicom_mentions=%s\n" $cmd $rc $((rss/1024)) \
    $(grep -c '^{' $O/$cmd.out) $(grep -c '"error"\|bad_input' $O/$cmd.out) $(grep -vc MAXRSS $O/$cmd.err) $(grep -c Traceback $O/$cmd.err) $(grep -ci pydicom $O/$cmd.err)
done
