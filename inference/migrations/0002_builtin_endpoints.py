from typing import Any

from django.db import migrations

from inference.catalog import IMAGE_ENDPOINTS, ensure_builtin_endpoints


def create(apps: Any, schema_editor: Any) -> None:
    ensure_builtin_endpoints(apps.get_model("inference", "Endpoint"), IMAGE_ENDPOINTS)


def remove(apps: Any, schema_editor: Any) -> None:
    Endpoint = apps.get_model("inference", "Endpoint")
    for spec in IMAGE_ENDPOINTS:
        Endpoint.objects.filter(owner=spec["owner"], name=spec["name"], path=spec["path"]).delete()


class Migration(migrations.Migration):
    dependencies = [("inference", "0001_initial")]
    operations = [migrations.RunPython(create, remove)]
