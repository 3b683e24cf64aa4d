"""``deepspeed.launcher``: the launcher under DeepSpeed's path (ds_launcher's ``ds-launch``)."""
