"""The WavLM x-vector backend: the same diarization path in-process and from an engine's ``xvector`` topic.

The checkpoint has random weights (none can be downloaded here), so these tests check the plumbing, not the
quality: the engine's x-vectors reach the clustering on the stream's timeline, the MQTT path gives exactly
the in-process result, and profiles enrolled with one backend are refused by another."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import soundfile as sf
from conftest import perturb_, save_hf_model, tiny_hf_config

from streamwavlm.cli import main
from streamwavlm.diarization import espeak
from streamwavlm.diarization.rttm import read_rttm

pytestmark = pytest.mark.skipif(not espeak.available(), reason="needs espeak-ng and sox (apt espeak-ng sox)")


@pytest.fixture(scope="module")
def sv_checkpoint(tmp_path_factory):
    from transformers import WavLMForXVector

    cfg = tiny_hf_config("base", use_weighted_layer_sum=True, tdnn_dim=(24, 24, 24, 24, 48), xvector_output_dim=16)
    return str(save_hf_model(perturb_(WavLMForXVector(cfg), seed=4), tmp_path_factory.mktemp("sv")))


@pytest.fixture(scope="module")
def talk(tmp_path_factory):
    conv = espeak.conversation(seed=5, speakers=2, duration=12)
    path = tmp_path_factory.mktemp("talk") / "talk.wav"
    sf.write(path, conv.audio, 16000)
    return conv, str(path)


COMMON = ["--backend", "wavlm", "--xvector", "30,10", "--chunk", "8", "--left", "50", "--latency", "1", "--quiet"]


def test_in_process_x_vectors_are_clustered_on_speech_only(sv_checkpoint, talk, tmp_path):
    conv, path = talk
    rttm = tmp_path / "h.rttm"
    assert main(["diarize", "--input", path, "--checkpoint", sv_checkpoint, "--rttm", str(rttm), *COMMON]) == 0
    hyp = read_rttm(rttm)["talk"]
    assert hyp and all(s.speaker for s in hyp)
    speech = sum(s.duration for s in conv.reference)
    assert sum(s.duration for s in hyp) <= 1.15 * speech  # silence gets no speaker
    assert max(s.end for s in hyp) <= len(conv.audio) / 16000 + 0.05


def test_xvector_topic_gives_the_in_process_result(sv_checkpoint, talk, tmp_path, mosquitto):
    _, path = talk
    local, remote = tmp_path / "local.rttm", tmp_path / "remote.rttm"
    assert main(["diarize", "--input", path, "--checkpoint", sv_checkpoint, "--vad", "none",
                 "--rttm", str(local), *COMMON]) == 0

    async def scenario() -> int:
        listener = asyncio.create_task(asyncio.to_thread(main, [
            "diarize", "--subscribe", mosquitto.url, "--prefix", "t", "--stream", "talk", "--seconds", "60",
            "--rttm", str(remote), "--backend", "wavlm", "--xvector", "30,10", "--latency", "1", "--quiet"]))
        await asyncio.sleep(1.5)  # subscribed
        assert await asyncio.to_thread(main, [
            "stream", "--input", path, "--broker", mosquitto.url, "--prefix", "t", "--checkpoint", sv_checkpoint,
            "--xvector", "30,10", "--chunk", "8", "--left", "50"]) == 0
        with contextlib.suppress(asyncio.TimeoutError):
            return await asyncio.wait_for(listener, 30)
        return -1

    assert asyncio.run(scenario()) == 0
    assert read_rttm(local)["talk"] and read_rttm(remote) == read_rttm(local)


def test_profiles_of_another_backend_are_refused(sv_checkpoint, talk, tmp_path, capsys):
    _, path = talk
    profiles = str(tmp_path / "p.json")
    assert main(["enroll", "alice", path, "--profiles", profiles]) == 0  # resemblyzer
    code = main(["diarize", "--input", path, "--checkpoint", sv_checkpoint, "--profiles", profiles, *COMMON])
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("streamwavlm")]
    assert len(err) == 1 and "backend 'resemblyzer'" in err[0]
    assert main(["enroll", "bob", path, "--profiles", str(tmp_path / "w.json"), "--backend", "wavlm",
                 "--checkpoint", sv_checkpoint, "--xvector", "30,10"]) == 0
