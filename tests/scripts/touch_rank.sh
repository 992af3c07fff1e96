#!/bin/sh
# torchrun's bin/test_script.sh: a non-Python worker (--no-python) records its rank.
echo "{\"RANK\": \"$RANK\", \"WORLD_SIZE\": \"$WORLD_SIZE\"}" > "$1/$RANK.json"
