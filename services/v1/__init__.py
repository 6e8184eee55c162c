"""Generated from protos/modalign/v1 by protos/generate.sh; do not edit."""
