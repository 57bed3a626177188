"""The acquisition node: medsec-edge serve between a modality and a PACS."""
