# pruneapp's web app on CPU: docker build -t pruneapp . && docker run -p 8501:8501 pruneapp
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN useradd --create-home --no-log-init --uid 10001 pruneapp

# CPU-only torch from PyTorch's own index: the plain PyPI wheel for Linux brings several GB of CUDA libraries.
# torch==2.13.0 in requirements.txt matches the index's 2.13.0+cpu, which pip prefers as the higher version.
COPY requirements.txt .
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt

COPY .streamlit/ .streamlit/
COPY pruneapp/ pruneapp/
COPY assets/ assets/
COPY app.py .
# The code stays root-owned and read-only to the app; uploads and outputs go to per-session dirs in /tmp.
USER 10001

EXPOSE 8501
# python:3.11-slim has no curl: ask the health endpoint with the standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=40s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"]
CMD ["streamlit", "run", "app.py", "--server.address=0.0.0.0", "--server.port=8501"]
