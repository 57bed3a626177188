#!/bin/bash
# usage: measure.sh BIN LABEL  -- one line per (command, bad file): rc, max RSS MB, seconds, tracebacks, last stderr line
BIN=$1; LABEL=$2; export HOME=/tmp/ioread8/home-$LABEL; mkdir -p $HOME; OUT=/tmp/ioread8/out-$LABEL; rm -rf $OUT; mkdir -p $OUT
KEYS=/tmp/ioread8/keys-$LABEL; [ -d $KEYS ] || $BIN keys new $KEYS >/dev/null
cd /tmp/ioread8/bad
for f in ${FILES:-*}; do
  for cmd in ${CMDS:-check}; do
    case $cmd in
      check|extract) args="$cmd --json $f";;
      embed) args="embed $f $OUT/e-$f";;
      run) args="run $f --out $OUT/run-$f";;
      verify) args="verify --json --keys $KEYS $f";;
      seal) args="seal $f $OUT/s-$f --keys $KEYS";;
      encrypt) args="encrypt $f $OUT/x-$f --to $KEYS";;
    esac
    start=$(date +%s.%N)
    ( ulimit -v 6000000; timeout 20 /usr/bin/time -f "MAXRSS_KB=%M" $BIN $args >$OUT/o 2>$OUT/e ); rc=$?
    end=$(date +%s.%N)
    rss=$(grep -o 'MAXRSS_KB=[0-9]*' $OUT/e | cut -d= -f2)
    tb=$(grep -c Traceback $OUT/e); lines=$(grep -v MAXRSS $OUT/e | grep -vc "Command exited")
    msg=$( (grep -o '"error": "[^"]*"' $OUT/o; grep -o '"reason": "[^"]*"' $OUT/o; grep -v MAXRSS $OUT/e | grep -v "Command exited" | grep -v '^\s*$') | tail -1 | cut -c1-${W:-150})
    printf "%-22s %-7s rc=%-3s rss=%sMB t=%.1fs tb=%s errlines=%s | %s\n" $f $cmd $rc $(( ${rss:-0}/1024 )) $(echo "$end-$start"|bc) $tb $lines "$msg"
  done
done
