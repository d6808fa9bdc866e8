#!/bin/bash
# interleaved before/after: anon_polls.mjs with PRS=CONC=n principals, separate-process probe
for rep in 1 2; do for st in sqlite memory; do for n in 2 4 8; do for side in base after; do
  cd /tmp/fair-$side/s
  r=$(STORE=$st PRS=$n CONC=$n DUR=8000 node anon_polls.mjs 2>&1 | grep -E "PROBE|polls" | tr '\n' ' ' | sed 's/STAT.*PROBE_IDLE/PROBE_IDLE/')
  echo "$side rep=$rep store=$st n=$n :: $r"
done; done; done; done
