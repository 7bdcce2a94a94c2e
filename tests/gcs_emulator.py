"""gcp-storage-emulator on 127.0.0.1:PORT (in memory, bucket `test-bucket`),
with two parts of GCS it lacks, as GCS documents them: generation
preconditions (ifGenerationMatch on uploads and deletes: 0 means "only if
absent", a mismatch is 412), which the workdir lock relies on, and the
`x-goog-generation` header of a download, which TensorStore reads.

  python tests/gcs_emulator.py PORT [DATA_DIR]

With DATA_DIR the objects outlive the emulator (a restart serves them again).
"""

import http
import sys

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

BUCKET = 'test-bucket'


def _precondition_failed(request, response, storage, object_name) -> bool:
  wanted = request.query.get('ifGenerationMatch')
  if not wanted or object_name is None:
    return False
  try:
    current = str(storage.get_file_obj(request.params['bucket_name'], object_name)['generation'])
  except NotFound:
    current = '0'
  if current == wanted[0]:
    return False
  response.status = http.HTTPStatus.PRECONDITION_FAILED
  response.json({'error': {'code': 412, 'message': 'At least one of the pre-conditions you specified did not hold.'}})
  return True


def _upload_name(request):
  if 'name' in request.query:
    return request.query['name'][0]
  data = request.data
  if isinstance(data, dict):
    meta = data.get('meta', data)
    return meta.get('name') if isinstance(meta, dict) else None
  return None


def _guard(handler, name_of):
  def guarded(request, response, storage, *args, **kwargs):
    if _precondition_failed(request, response, storage, name_of(request)):
      return None
    return handler(request, response, storage, *args, **kwargs)
  return guarded


def _with_generation(handler):
  def download(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = str(obj['generation'])
      response['x-goog-metageneration'] = str(obj.get('metageneration', 1))
    except NotFound:
      pass
    return handler(request, response, storage, *args, **kwargs)
  return download


objects.insert = _guard(objects.insert, _upload_name)
objects.download = _with_generation(objects.download)
objects.delete = _guard(objects.delete, lambda request: request.params.get('object_id'))

from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  data_dir = sys.argv[2] if len(sys.argv) > 2 else None
  server.create_server('127.0.0.1', int(sys.argv[1]), in_memory=data_dir is None, default_bucket=BUCKET,
                       data_dir=data_dir).run()
