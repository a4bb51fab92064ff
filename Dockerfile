# CPU image of oomlens (GPU hosts: build FROM an image with CUDA and set OOMLENS_TORCH).
# Not built in CI: this project's machines have no Docker engine.
FROM python:3.11-slim
WORKDIR /opt/oomlens
COPY . .
ENV OOMLENS_WORKSPACE=/data \
    OOMLENS_TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN bash scripts/setup.sh
VOLUME /data
CMD ["bash", "scripts/start.sh"]
