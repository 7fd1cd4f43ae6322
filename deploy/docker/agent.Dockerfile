# syntax=docker/dockerfile:1
# The Local Agent for GPU hosts, on vLLM's own image, so that workers with `launcher: process` start
# `python3 -m vllm.entrypoints.openai.api_server` inside this container. Build from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t llm-router-agent .
# CPU hosts: --build-arg VLLM_IMAGE=vllm/vllm-openai-cpu:v0.33.0-x86_64 (what deploy/compose's agent profile does).
# Run: mount a config file (see README "Local Agent") and point AGENT_CONFIG at it; GPUs with --gpus.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0

FROM ${VLLM_IMAGE}
# Our package goes into the interpreter that has vLLM (the agent starts workers with its own
# sys.executable), constrained to the versions the image already has: a dependency that would move one
# of vLLM's packages fails the build here instead of breaking vLLM at run time.
COPY pyproject.toml README.md /tmp/llm-router/
COPY router /tmp/llm-router/router
COPY local_agent /tmp/llm-router/local_agent
RUN python3 -m pip list --format=freeze > /tmp/vllm-constraints.txt \
    && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir --disable-pip-version-check \
        --constraint /tmp/vllm-constraints.txt /tmp/llm-router \
    && rm -rf /tmp/llm-router /tmp/vllm-constraints.txt \
    && python3 -c "import vllm, local_agent.main"
# vLLM runs as any user with a writable HOME (its caches, Triton's and Hugging Face's live under it)
RUN useradd --uid 10001 --create-home --home-dir /home/agent --shell /usr/sbin/nologin agent \
    && mkdir -p /home/agent/.cache/huggingface /home/agent/logs \
    && chown -R agent:agent /home/agent
# Local Agent settings (local_agent.config): worker logs next to the agent, the config file mounted here
ENV AGENT_LOG_DIR=/home/agent/logs \
    AGENT_CONFIG=/etc/local-agent/agent.yaml
VOLUME ["/home/agent/.cache/huggingface"]
WORKDIR /home/agent
USER 10001:10001
EXPOSE 5000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
# vLLM's image starts `vllm serve`; this one starts the agent, which starts the workers its config names
ENTRYPOINT []
CMD ["python3", "-m", "uvicorn", "local_agent.main:app", "--host", "0.0.0.0", "--port", "5000", "--no-access-log"]
