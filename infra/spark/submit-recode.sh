#!/usr/bin/env bash
# Run the nightly recode with spark-submit as its driver (client mode), from the repository root
# of an environment where the project is installed (`pip install .`, or the sa2crq:cpu image):
#
#   SPARK_MASTER=yarn infra/spark/submit-recode.sh
#   SPARK_MASTER=k8s://https://kubernetes.default.svc:443 infra/spark/submit-recode.sh --force
#   SPARK_MASTER=spark://HOST:7077 CONFIG= infra/spark/submit-recode.sh --set items=s3://... --set ...
#
# Environment: CONFIG (the job config file; empty for none, every setting then a --set: a driver
# started by `ray job submit` has no config file on its disk), PROPERTIES (Spark properties file),
# SPARK_MASTER (required without CONFIG), DRIVER_MEMORY, DIRECT_OBJECT_STORE (default true; false
# only where every executor shares the driver's disk: the one-machine cluster of infra/README.md).
#
# The recode job is one Python program that uses Spark, Ray and S3 together, so spark-submit
# runs the CLI module itself (jobs/cli.py, as installed) with `recode` and its arguments:
#   * Spark: the job's SparkSession builder (jobs/engines.py: spark_session) takes the
#     properties below; its own config's spark.master, spark.shuffle_partitions and
#     spark.driver.memory take precedence, so the master is passed to both and kept equal.
#     spark.direct_object_store = true (s3a:// read and written by Spark) is set here.
#   * Ray: ray.address in the config ("auto", or RAY_ADDRESS) names the Ray cluster to attach to.
#   * S3: storage.endpoint_url (or AWS_ENDPOINT_URL) must be set; credentials come from the
#     standard AWS environment. Ray workers need the same endpoint in their own environment.
# Client mode only: in cluster mode the driver would run in a Spark image without the project.
# Extra arguments go to the job (e.g. --force, --reuse-tokenizer VERSION, --set k=v).
set -euo pipefail

CONFIG=${CONFIG-infra/configs/recode.yaml}
PROPERTIES=${PROPERTIES:-infra/spark/spark-submit.conf}
if [[ -n "$CONFIG" ]]; then
  SPARK_MASTER=${SPARK_MASTER:-$(python -c 'import sys; from sa2crq.config import read_config_file; print(read_config_file(sys.argv[1])["spark"]["master"])' "$CONFIG")}
  CONFIG_ARGS=(--config "$CONFIG")
else
  : "${SPARK_MASTER:?without CONFIG, set SPARK_MASTER}"
  CONFIG_ARGS=()
fi
DIRECT_OBJECT_STORE=${DIRECT_OBJECT_STORE:-true}
DRIVER_MEMORY=${DRIVER_MEMORY:-8g}

# Spark's driver binds and advertises this address; executors must reach it. Without it the job
# falls back to 127.0.0.1 (the single-machine default).
export SPARK_LOCAL_IP=${SPARK_LOCAL_IP:-$(hostname -i | awk '{print $1}')}
export HF_HUB_OFFLINE=1

CLI=$(python -c 'import jobs.cli; print(jobs.cli.__file__)')
# spark-submit runs the CLI as a file, so Python puts jobs/ first on sys.path, not the directory
# jobs/ lies in: name it, so that the driver imports the same project as the line above.
export PYTHONPATH="$(dirname "$(dirname "$CLI")")${PYTHONPATH:+:$PYTHONPATH}"

exec spark-submit \
  --master "$SPARK_MASTER" \
  --deploy-mode client \
  --driver-memory "$DRIVER_MEMORY" \
  --properties-file "$PROPERTIES" \
  --name sa2crq-recode \
  "$CLI" recode "${CONFIG_ARGS[@]}" --set "spark.master=$SPARK_MASTER" --set "spark.direct_object_store=$DIRECT_OBJECT_STORE" "$@"
